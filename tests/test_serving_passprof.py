"""LAYERSTREAM_PROFILE_PASSES (engine.serving.passprof): the variable's forms; the first N passes that feed prompts
profiled into their files, decode-only passes never; the tokens stay those of an unprofiled run; a directory that
cannot be written costs the profile only."""

from __future__ import annotations

import logging

import pytest

from engine.serving.params import SamplingParams
from engine.serving.passprof import PassProfiler
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import random_prompts
from tests.sched_helpers import engines, run_all  # noqa: F401 (the fixture)


@pytest.mark.parametrize("spec,where,limit", [
    ("/tmp/prof", "/tmp/prof", 4), ("/tmp/prof:2", "/tmp/prof", 2), ("rel/dir:10", "rel/dir", 10),
    ("/tmp/a:b", "/tmp/a:b", 4),  # a colon not followed by a count belongs to the path
])
def test_the_variable_names_a_directory_and_a_count(monkeypatch, spec, where, limit):
    monkeypatch.setenv("LAYERSTREAM_PROFILE_PASSES", spec)
    prof = PassProfiler.from_env()
    assert str(prof.directory) == where and prof.limit == limit


def test_unset_or_empty_profiles_nothing(monkeypatch):
    monkeypatch.delenv("LAYERSTREAM_PROFILE_PASSES", raising=False)
    assert PassProfiler.from_env() is None
    monkeypatch.setenv("LAYERSTREAM_PROFILE_PASSES", "")
    assert PassProfiler.from_env() is None


def _run(multi, profiler, monkeypatch) -> list[list[int]]:
    sched = Scheduler(multi)
    sched.profiler = profiler
    monkeypatch.setattr("engine.serving.passprof.MIN_TOKENS", 8)  # the 5-token prompt's pass is not profiled
    prompts = random_prompts([9, 20, 5], multi.cfg.vocab_size, seed=4)
    seqs = [Sequence(p, SamplingParams(max_tokens=4), multi.tokenizer) for p in prompts]
    run_all(sched, seqs, arrivals={0: 0, 1: 0, 2: 3})  # a third prompt arrives among decode steps
    return [s.output_ids for s in seqs]


def test_first_prompt_passes_profiled_tokens_unchanged(engines, tmp_path, monkeypatch):  # noqa: F811
    _, multi = engines
    plain = _run(multi, None, monkeypatch)
    prof = PassProfiler(tmp_path / "prof", limit=2)
    assert _run(multi, prof, monkeypatch) == plain
    files = sorted((tmp_path / "prof").glob("pass_*.txt"))
    assert len(files) == 2 and prof.done == 2  # the limit: later prompt passes run unprofiled
    prof = PassProfiler(tmp_path / "all", limit=10)
    _run(multi, prof, monkeypatch)  # the first prompts' two passes (29 and 13 tokens waiting), not the 5-token one's
    assert sorted(f.name for f in (tmp_path / "all").glob("*.txt")) == ["pass_1.txt", "pass_2.txt"]
    text = files[0].read_text()
    assert text.startswith("pass at step 1:") and "tokens" in text and "tottime" in text and "cumulative" in text
    assert "runner.py" in text  # the pass's own functions are in it
    host, thread = text.splitlines()[1:3]  # what the rest of the machine did meanwhile
    assert host.startswith("host: user ") and "steal" in host, host
    assert thread.startswith("this thread: CPU ") and "context switches" in thread, thread
    assert "garbage collections: gen0 " in text and "objects frozen" in text
    assert "called by" in text  # the callers of the calls seen slow


def test_an_unwritable_directory_costs_only_the_profile(engines, tmp_path, caplog, monkeypatch):  # noqa: F811
    _, multi = engines
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    prof = PassProfiler(blocker / "prof", limit=1)
    with caplog.at_level(logging.WARNING, logger="engine.serving.passprof"):
        assert _run(multi, prof, monkeypatch) == _run(multi, None, monkeypatch)
    assert "cannot write" in caplog.text


def test_a_collection_during_the_pass_is_counted_and_timed(tmp_path):
    import gc

    prof = PassProfiler(tmp_path, 1)
    assert prof.run(7, lambda: gc.collect(2) * 0 + 5, lambda: 300) == 5
    text = (tmp_path / "pass_7.txt").read_text()
    line = next(x for x in text.splitlines() if x.startswith("garbage collections:"))
    assert "gen2 1 (" in line and "gen0 0 (0.0 ms)" in line, line
    assert gc.callbacks == [] or all(type(c).__name__ != "_GcTimer" for c in gc.callbacks)  # removed after
