"""tools/ttft_breakdown.py: a load test's requests against the server's step log."""

from __future__ import annotations

import json

from tests.serve_helpers import Server
from tools import bench_serve, ttft_breakdown


def _write(tmp_path, rows: list[dict], steps: list[dict]):
    sj, sl = tmp_path / "serve.json", tmp_path / "steps.jsonl"
    sj.write_text(json.dumps(rows))
    sl.write_text("".join(json.dumps(s) + "\n" for s in steps))
    return sj, sl


def _step(n: int, end: float, dur: float, batch: int, tokens: int, waiting: int) -> dict:
    return {"step": n, "start_s": end - dur, "mono_s": end, "step_s": dur, "batch": batch, "tokens": tokens,
            "waiting": waiting, "generated_total": n}


def test_counts_the_passes_between_send_and_first_token(tmp_path, capsys) -> None:
    steps = [_step(1, 100.3, 0.3, 1, 500, 2), _step(2, 101.0, 0.7, 3, 3000, 0), _step(3, 101.3, 0.3, 3, 3, 0)]
    steps[1]["arrived_s"] = [100.105, 100.2125]  # the two it admitted arrived (tokenized) then
    reqs = [{"sent_s": 100.0, "first_s": 100.31, "prompt_tokens": 500, "tokens": 4},  # the first pass: 1
            {"sent_s": 100.1, "first_s": 101.01, "prompt_tokens": 1500, "tokens": 4},  # passes 1 and 2
            {"sent_s": 100.2, "first_s": 101.02, "prompt_tokens": 1500, "tokens": 4}]
    rows = [{"config": "server", "clients": 3, "per_request": reqs},
            {"config": "resident", "clients": 3, "per_request": reqs[:1]}]
    sj, sl = _write(tmp_path, rows, steps)
    assert ttft_breakdown.main([str(sj), str(sl), "--clients", "3"]) == 0
    out = capsys.readouterr().out
    assert "server, 3 clients: TTFT p50 820 ms; passes before the first token: median 2, min 1, max 2" in out
    assert "the median request (1500 prompt tokens)" in out  # the third: sent at 100.2, first token at 101.02
    assert "    -200 ms     300 ms  batch   1  tokens    500  waiting 2" in out  # running when it was sent
    assert "    +100 ms     700 ms  batch   3  tokens   3000  waiting 0  admitted arrivals -95.0..+12.5 ms\n" in out
    assert "waiting 2\n" in out  # a pass with no arrivals logged says nothing of them
    steps[1]["received_s"] = [100.1025, 100.2]  # when their requests reached the app (newer logs say)
    sj, sl = _write(tmp_path, rows, steps)
    assert ttft_breakdown.main([str(sj), str(sl), "--clients", "3"]) == 0
    assert "admitted arrivals -95.0..+12.5 ms (received -97.5..+0.0)\n" in capsys.readouterr().out
    steps[1].update(host_allocs=48, host_alloc_us=41000, alloc_syncs=0)  # allocator counters that grew (since s55)
    sj, sl = _write(tmp_path, rows, steps)
    assert ttft_breakdown.main([str(sj), str(sl), "--clients", "3"]) == 0
    assert "(received -97.5..+0.0)  [host_allocs 48, host_alloc_us 41000]\n" in capsys.readouterr().out
    assert "first token at +820 ms" in out
    assert "resident" not in out  # --config server is the default


def test_bad_inputs_get_an_error_not_a_traceback(tmp_path, capsys) -> None:
    old = [{"step": 1, "start_s": 0.0, "step_s": 0.1, "batch": 1, "tokens": 1, "waiting": 0}]
    sj, sl = _write(tmp_path, [{"config": "server", "clients": 1, "per_request": []}], old)
    assert ttft_breakdown.main([str(sj), str(sl)]) == 2
    assert "no pass with 'mono_s'" in capsys.readouterr().err
    sl.write_text("not json\n")
    assert ttft_breakdown.main([str(sj), str(sl)]) == 2
    assert "steps.jsonl:1: not a JSON line" in capsys.readouterr().err
    sl.write_text(json.dumps(_step(1, 1.0, 0.1, 1, 1, 0)) + "\n")
    assert ttft_breakdown.main([str(sj), str(sl), "--clients", "16"]) == 2
    assert "no 'server' row at those levels" in capsys.readouterr().err


def test_a_live_server_and_load_test_line_up(tiny_qwen2_dir, tmp_path, capsys) -> None:
    """bench_serve's request times and the server's --step-log share a clock: every request's first token
    comes at the end of a pass that ended after it was sent."""
    log = tmp_path / "steps.jsonl"
    srv = Server(tiny_qwen2_dir, "--max-batch", "4", "--max-context", "128", "--step-log", str(log))
    try:
        out = tmp_path / "serve.json"
        rc = bench_serve.main(["--url", srv.url, "--clients", "3", "--requests-per-client", "1",
                               "--prompt-tokens", "4:20", "--max-tokens", "3:5", "--json", str(out)])
    finally:
        srv.stop()
    assert rc == 0, capsys.readouterr()
    capsys.readouterr()
    steps = ttft_breakdown.load_steps(log)
    row = json.loads(out.read_text())[0]
    assert len(row["per_request"]) == 3
    for r in row["per_request"]:
        assert r["sent_s"] < r["first_s"] and 4 <= r["prompt_tokens"] <= 20
        assert len(ttft_breakdown.passes_of(r, steps)) >= 1
    first_sent = min(r["sent_s"] for r in row["per_request"])  # (after bench_serve's uncounted warm-up request)
    level = [s for s in steps if s["mono_s"] > first_sent]
    admitting = [s for s in level if "arrived_s" in s]  # the passes that admitted the 3 requests say when they came
    assert admitting and admitting[0] is level[0]
    for s in admitting:
        assert first_sent < s["arrived_s"][0] <= s["arrived_s"][1] <= s["mono_s"] - s["step_s"]
        # each request reached the app before it was tokenized and submitted: the first and last of them too
        assert first_sent < s["received_s"][0] <= s["arrived_s"][0] and s["received_s"][1] <= s["arrived_s"][1]
    assert ttft_breakdown.main([str(out), str(log)]) == 0
    assert "server, 3 clients: TTFT p50" in capsys.readouterr().out


def test_the_target_and_its_floor_come_from_the_runs_own_passes(tmp_path, capsys) -> None:
    # decode steps of 0.1 s; two prompt passes bound by their tokens: 0.5 s for 5,000 tokens, 0.3 s for 1,000
    # (0.8 s / 6,000 tokens: 133.3 us a token); by TTFT the second request is the median (rank 2 of 3)
    steps = [_step(1, 100.5, 0.5, 2, 5000, 1), _step(2, 100.8, 0.3, 3, 1000, 0), _step(3, 100.9, 0.1, 3, 3, 0)]
    reqs = [{"sent_s": 100.0, "first_s": 100.5, "prompt_tokens": 3000, "tokens": 4},
            {"sent_s": 100.0, "first_s": 100.5, "prompt_tokens": 2000, "tokens": 4},
            {"sent_s": 100.0, "first_s": 100.81, "prompt_tokens": 1000, "tokens": 4}]
    sj, sl = _write(tmp_path, [{"config": "server", "clients": 3, "per_request": reqs, "itl_p50_s": 0.1}], steps)
    assert ttft_breakdown.main([str(sj), str(sl)]) == 0
    out = capsys.readouterr().out
    # own prefill: 2,000 tokens x 133.3 us = 267 ms (more than one step); target 2 x 100 + 267 = 467 ms
    assert ("target: 2 steps (100 ms, the ITL p50) + its own prefill (2000 tokens at 133.3 us a token, at least one "
            "step: 267 ms) = 467 ms; TTFT p50 500 ms (1.07x): missed") in out
    assert "floor: 2 first tokens need at least the 2 shortest prompts computed (3000 tokens, 400 ms" in out
    # passes that hid under the stream give no cost, so no target
    steps = [_step(1, 100.12, 0.12, 1, 500, 0)]
    sj, sl = _write(tmp_path, [{"config": "server", "clients": 1, "itl_p50_s": 0.1,
                                "per_request": [{"sent_s": 100.0, "first_s": 100.13, "prompt_tokens": 500}]}], steps)
    assert ttft_breakdown.main([str(sj), str(sl)]) == 0
    assert "no prompt pass of this level was bound by its tokens" in capsys.readouterr().out
