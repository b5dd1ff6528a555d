"""The chat page at / in a real browser (Debian's headless chromium, driven over the DevTools pipe)."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.serve_helpers import Server

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")


def test_chat_page_streams_multi_turn_and_stops(tiny_qwen2_dir, tmp_path):
    from tools.cdp import Browser
    from tools.chat_page_check import check_page

    # OpenAI's sampling defaults: the page's temperature 0 alone then decodes greedily, without the model's penalty
    srv = Server(tiny_qwen2_dir, "--max-context", "1024", "--max-batch", "2", "--generation-config", "openai")
    page = None
    try:
        page = Browser(srv.url + "/")
        summary = check_page(page, long_tokens=600)
        page.screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
        first, _, stopped = summary["turns"]
        assert first["bubbles"][1][1], "the first reply is empty"
        deadline = time.monotonic() + 10
        while srv.metric("layerstream_requests_running") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.metric("layerstream_requests_running") == 0  # the stopped reply freed its slot
    finally:
        if page is not None:
            page.close()
        rc, err = srv.stop()
    assert rc == 0, err
