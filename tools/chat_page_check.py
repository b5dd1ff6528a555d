"""Drive the server's chat page in headless Chromium: two turns, a stopped reply, a screenshot.

    python tools/chat_page_check.py [--model M] [--screenshot bench/results/chat-page.png] [server flags...]

Starts ``python -m engine.serve`` on a free local port, opens ``/`` in Debian's chromium over the
DevTools pipe, types messages, waits for each streamed reply, stops a long one mid-stream, checks
what the page kept, saves a screenshot and prints one JSON summary. Exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.cdp import Browser  # noqa: E402
from tools.serve_process import start_server  # noqa: E402

DONE = "!document.getElementById('send').disabled && !document.getElementById('stats').textContent.endsWith('…')"


def turn(page: Browser, text: str, timeout: float = 120.0) -> dict:
    """Type a message, press Enter, wait for the streamed reply to end; the page's state after it."""
    users = page.js("document.querySelectorAll('.msg.user').length")
    page.js("document.getElementById('input').focus()")
    page.type(text)
    page.press_enter()
    wait(page, f"document.querySelectorAll('.msg.user').length === {users + 1}", timeout=10)
    wait(page, DONE, timeout)
    return state(page)


def state(page: Browser) -> dict:
    return page.js("""({
        bubbles: [...document.querySelectorAll('.msg')].map(d => [d.className.replace('msg ', ''), d.textContent]),
        conversation: conversation.map(m => m.role), stats: document.getElementById('stats').textContent})""")


def wait(page: Browser, expression: str, timeout: float) -> None:
    """``page.wait_for`` whose timeout says what the page showed (bubbles, stats) at that moment."""
    try:
        page.wait_for(expression, timeout)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; the page showed {state(page)}") from None


def check_page(page: Browser, long_tokens: int = 400) -> dict:
    """Two turns and a stopped third; raises AssertionError naming what the page got wrong.

    Replies are greedy (temperature 0): a sampled reply of a random-weight test model can end on
    an early end-of-sequence token, leaving no long reply to stop.
    """
    wait(page, "document.getElementById('model').textContent.startsWith('model: ')", timeout=30)
    page.js("document.getElementById('temperature').value = 0")
    page.js("document.getElementById('max_tokens').value = 24")
    first = turn(page, "Hello! What can you do?")
    assert [b[0] for b in first["bubbles"]] == ["user", "assistant"], first
    assert first["conversation"] == ["user", "assistant"] and "tok/s" in first["stats"], first
    second = turn(page, "Tell me more about it.")
    assert second["conversation"] == ["user", "assistant"] * 2, second
    page.js(f"document.getElementById('max_tokens').value = {long_tokens}")
    page.js("document.getElementById('input').focus()")
    page.type("Now write a very long story.")
    page.press_enter()
    wait(page, "document.querySelectorAll('.msg.assistant').length === 3 && "
         "document.querySelectorAll('.msg.assistant')[2].textContent.length > 12", timeout=60)
    page.js("document.getElementById('stop').click()")
    wait(page, DONE, timeout=10)
    stopped = state(page)
    assert stopped["conversation"] == ["user", "assistant"] * 3, stopped
    assert not stopped["stats"].startswith(f"{long_tokens} tokens"), stopped
    return {"turns": [first, second, stopped]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--screenshot", default=str(ROOT / "bench" / "results" / "chat-page.png"))
    args, server_flags = p.parse_known_args(argv)
    # OpenAI's sampling defaults: the page's temperature 0 alone decodes greedily (no model penalty); flags win
    server_flags = ["--generation-config", "openai", *server_flags]
    proc, url = start_server(server_flags, timeout=180.0, keep_stderr=True,
                             env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    page = None
    try:
        page = Browser(url + "/")
        summary = check_page(page)
        page.js("document.getElementById('log').scrollTop = 0")
        page.screenshot(args.screenshot)
        with urllib.request.urlopen(url + "/metrics") as r:
            running = [ln for ln in r.read().decode().splitlines() if ln.startswith("layerstream_requests_running ")]
        summary.update(screenshot=args.screenshot, url=url, running_after=running)
        print(json.dumps(summary, indent=1))
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        rc = proc.wait(60)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
