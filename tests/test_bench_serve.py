"""tools/bench_serve.py against a live tiny server: every request complete, the summary consistent."""

from __future__ import annotations

import json

import pytest

from tests.serve_helpers import Server
from tools.bench_serve import main, percentile


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)


def test_levels_against_a_live_server(tiny_qwen2_dir, tmp_path, capsys):
    srv = Server(tiny_qwen2_dir, "--max-batch", "4", "--max-context", "128")
    try:
        out = tmp_path / "levels.json"
        rc = main(["--url", srv.url, "--clients", "1,3", "--requests-per-client", "2", "--prompt-tokens", "4:20",
                   "--shared-prefix", "8",
                   "--max-tokens", "5:9", "--json", str(out)])
    finally:
        srv.stop()
    assert rc == 0, capsys.readouterr()
    rows = json.loads(out.read_text())
    assert [r["clients"] for r in rows] == [1, 3] and [r["requests"] for r in rows] == [2, 6]
    for r in rows:
        assert r["errors"] == 0 and r["complete"] == r["requests"] and 5 * r["requests"] <= r["tokens"] <= 9 * r["requests"]
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] < r["wall_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
        assert r["streamed_gb_s"] == 0.0  # everything resident on the CPU: nothing streams


def test_bad_flags_exit_2(capsys):
    assert main(["--clients", "1"]) == 2
    assert main(["--url", "http://x", "--prompt-tokens", "9:3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
