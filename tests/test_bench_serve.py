"""tools/bench_serve.py against a live tiny server: every request complete, the summary consistent."""

from __future__ import annotations

import json

import pytest

from tests.serve_helpers import Server
from tools.bench_serve import WARMUP_TOKENS, main, percentile


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
        generated = srv.metric("layerstream_generation_tokens_total")
    finally:
        srv.stop()
    printed = capsys.readouterr()
    assert rc == 0, printed
    rows = json.loads(out.read_text())
    assert [r["clients"] for r in rows] == [1, 3] and [r["requests"] for r in rows] == [2, 6]
    # the warm-up request reached the server before the levels, and no row counts it
    assert "server: one warm-up request first, not counted" in printed.out
    assert generated == WARMUP_TOKENS + sum(r["tokens"] for r in rows)
    for r in rows:
        assert r["errors"] == 0 and r["complete"] == r["requests"]
        assert 5 * r["requests"] <= r["tokens"] <= 9 * r["requests"]
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] < r["wall_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
        assert r["streamed_gb_s"] == 0.0  # everything resident on the CPU: nothing streams
        assert sorted({q["client"] for q in r["per_request"]}) == list(range(r["clients"]))
    one, three = rows
    assert "vs_one" not in one and three["vs_one"] == pytest.approx(three["tok_s"] / one["tok_s"])
    assert 0 < three["ceiling_vs_one"] and "3 clients: " in printed.out and "of it" in printed.out


def test_scaling_ceiling_is_the_busiest_client_at_one_clients_latency():
    """Two clients of 10 + 20 and 5 tokens at 0.1 s a token: done at best in 3 s, 35 tokens: 11.67 tok/s;
    one client made 8 tok/s: ceiling 1.46x; measured 10 tok/s: 1.25x."""
    from tools.bench_serve import scaling
    reqs = [{"client": 0, "tokens": 10}, {"client": 0, "tokens": 20}, {"client": 1, "tokens": 5}]
    vs, ceiling = scaling({"per_request": reqs, "tokens": 35, "tok_s": 10.0}, {"tok_s": 8.0, "itl_mean_s": 0.1})
    assert vs == pytest.approx(1.25) and ceiling == pytest.approx(35 / 3.0 / 8.0)
    assert scaling({"per_request": [], "tokens": 0, "tok_s": 0.0}, {"tok_s": 8.0, "itl_mean_s": 0.1}) is None


def test_bad_flags_exit_2(capsys):
    assert main(["--clients", "1"]) == 2
    assert main(["--url", "http://x", "--prompt-tokens", "9:3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_accelerate_peer_serves_the_one_client_requests(tiny_qwen2_dir, tmp_path, capsys):
    """--peer-accelerate: transformers + accelerate serve the 1-client level's requests one by one, in the
    same run and the same row shape, labelled peer."""
    srv = Server(tiny_qwen2_dir, "--max-batch", "2", "--max-context", "128")
    try:
        out = tmp_path / "rows.json"
        rc = main(["--url", srv.url, "--clients", "1", "--requests-per-client", "2", "--prompt-tokens", "4:12",
                   "--max-tokens", "3:6", "--peer-accelerate", "1GiB", "--peer-model", str(tiny_qwen2_dir),
                   "--peer-time-limit", "300", "--json", str(out)])
    finally:
        srv.stop()
    assert rc == 0, capsys.readouterr()
    served, peer = json.loads(out.read_text())
    assert served["config"] == "server" and peer["config"] == "peer" and peer["engine"] == "transformers+accelerate"
    assert peer["requests"] == peer["requests_total"] == peer["complete"] == 2 and not peer["stopped_by_time_limit"]
    assert peer["tokens"] == served["tokens"]  # the same requests: the same drawn token counts
    assert 0 < peer["ttft_p50_s"] <= peer["ttft_p99_s"] < peer["wall_s"] and 0 < peer["itl_p50_s"] <= peer["itl_p99_s"]
    assert peer["tok_s"] == pytest.approx(peer["tokens"] / peer["wall_s"]) and peer["streamed_gb_s"] is None
    assert "peer (one by one)" in capsys.readouterr().out


def test_the_peer_stops_at_its_time_limit(tiny_qwen2_dir):
    """Far more work than the limit allows: it stops by itself, mid-request, and reports what it finished."""
    from tools.bench_serve_peer import run_peer

    jobs = [([5, 6, 7, 8], 4000)] * 3
    row = run_peer(str(tiny_qwen2_dir), None, jobs, time_limit=1.0)
    assert row["stopped_by_time_limit"] and row["requests_total"] == 3
    assert row["complete"] == 0 and 0 < row["tokens"] < 4000 and row["requests"] == 1
    assert 1.0 <= row["wall_s"] < 10.0 and row["tok_s"] == pytest.approx(row["tokens"] / row["wall_s"])


def test_all_resident_reruns_the_levels_without_the_budget(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "rows.json"
    flags = f"--model {tiny_qwen2_dir} --device cpu --vram-budget 1GiB --max-batch 2 --max-context 64"
    rc = main(["--serve", flags, "--all-resident", "--clients", "2", "--requests-per-client", "1",
               "--prompt-tokens", "4:8", "--max-tokens", "3", "--json", str(out),
               "--server-log", str(tmp_path / "server.log")])
    assert rc == 0, capsys.readouterr()
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["server", "resident"]
    assert (tmp_path / "server.log").read_text().count("layerstream: serving") == 2  # both servers' stderr
    assert all(r["complete"] == r["requests"] == 2 and r["tokens"] == 6 for r in rows)


def test_rows_are_written_before_the_peer_runs(tmp_path, monkeypatch):
    """A run cut short in its slow peer (a device call's time box) keeps the served levels' rows."""
    import tools.bench_serve as bs
    import tools.bench_serve_peer as peer

    out = tmp_path / "rows.json"
    row = {"config": "server", "clients": 1, "requests": 1, "complete": 1, "errors": 0}
    monkeypatch.setattr(bs, "server_rows", lambda args, config, flags: [{**row, "config": config}])
    monkeypatch.setattr(bs, "_print_row", lambda r: None)

    def cut(*a, **k):
        assert [r["config"] for r in json.loads(out.read_text())] == ["server", "resident"]
        raise KeyboardInterrupt  # the box's kill

    monkeypatch.setattr(peer, "run_peer", cut)
    with pytest.raises(KeyboardInterrupt):
        bs.main(["--serve", f"--model {tmp_path} --vram-budget 6GiB", "--all-resident", "--clients", "1",
                 "--peer-accelerate", "6GiB", "--json", str(out)])
    assert [r["config"] for r in json.loads(out.read_text())] == ["server", "resident"]


@pytest.mark.parametrize("argv", [
    ["--serve", "--model m", "--all-resident"],  # nothing to drop
    ["--url", "http://x", "--peer-accelerate", "6GiB"],  # no model directory for the peer
    ["--url", "http://x", "--peer-accelerate", "6", "--peer-model", "."],  # no unit
    ["--url", "http://x", "--peer-accelerate", "6GiB", "--peer-model", ".", "--peer-time-limit", "0"],
])
def test_bad_peer_flags_exit_2(capsys, argv):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_an_aborted_stream_is_an_error_not_an_empty_success():
    """A stream that ends with finish_reason "abort" (the server gave up on the request) raises, so the level
    counts it among its errors (session 20: a server whose GPU was lost answered every request that way)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tools.bench_serve import one_request

    class Aborting(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = ('data: {"choices":[{"index":0,"text":"","finish_reason":"abort"}]}\n\n'
                    'data: [DONE]\n\n').encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Aborting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="finish_reason 'abort' after 0 chunks"):
            one_request(f"http://127.0.0.1:{srv.server_port}", "m", [1, 2, 3], 4)
    finally:
        srv.shutdown()
        srv.server_close()
