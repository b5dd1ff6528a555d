"""bench/pass_costs.py: a step log's prompt passes, their time a token and the allocator counters that grew."""

from __future__ import annotations

import json

import pytest

from bench import pass_costs


def _step(n: int, tokens: int, seconds: float, **counts) -> dict:
    return {"step": n, "tokens": tokens, "step_s": seconds, "batch": 16, **counts}


def test_lists_the_prompt_passes_with_what_their_allocators_paid(tmp_path, capsys):
    log = tmp_path / "steps.jsonl"
    steps = [_step(1, 16, 0.077), _step(2, 6174, 0.2291, dev_allocs=2), _step(3, 12543, 0.5346, host_allocs=48,
                                                                               host_alloc_us=41000),
             _step(4, 6174, 0.191, alloc_syncs=0)]
    log.write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert pass_costs.main([str(log)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3  # the decode step is left out
    assert out[0] == "pass     2    6174 tokens    229.1 ms   37.1 us a token  batch  16  {'dev_allocs': 2}"
    assert out[1].endswith("42.6 us a token  batch  16  {'host_allocs': 48, 'host_alloc_us': 41000}")
    assert out[2].endswith("30.9 us a token  batch  16")  # a counter that did not grow says nothing
    assert pass_costs.main([str(log), "--min-tokens", "10"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.mark.parametrize("text", [None, "not json\n"])
def test_a_missing_or_bad_log_gets_an_error(tmp_path, capsys, text):
    log = tmp_path / "steps.jsonl"
    if text is not None:
        log.write_text(text)
    assert pass_costs.main([str(log)]) == 2
    assert "give a server's --step-log file" in capsys.readouterr().err
