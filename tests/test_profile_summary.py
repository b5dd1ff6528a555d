"""tools/profile_summary.py on hand-made speedscope profiles: inclusive seconds per function and thread,
recursion counted once, the difference against a base run, and a clear error for a file that is not one."""

from __future__ import annotations

import json

import pytest

from tools import profile_summary

FRAMES = [{"name": "_run_module_as_main", "file": "<frozen runpy>"},  # 0
          {"name": "main", "file": "/w/engine/run.py"},  # 1
          {"name": "Engine.__init__", "file": "/w/engine/engine.py"},  # 2
          {"name": "compile", "file": "/x/site-packages/triton/compiler/compiler.py"},  # 3
          {"name": "helper", "file": "/x/site-packages/numpy/core.py"},  # 4: not ours, not a listed entry point
          {"name": "fastest", "file": "/w/kernels/tuning.py"},  # 5
          {"name": "_worker", "file": "/usr/lib/python3.12/concurrent/futures/thread.py"}]  # 6


def write(path, main_samples, worker_samples=(), workers=1):
    profiles = [{"type": "sampled", "name": 'Thread 7 ""', "unit": "seconds",
                 "samples": [s for s, _ in main_samples], "weights": [w for _, w in main_samples]}]
    for i in range(workers if worker_samples else 0):
        profiles.append({"type": "sampled", "name": f'Thread {9 + i} "compile_{i}"', "unit": "seconds",
                         "samples": [s for s, _ in worker_samples], "weights": [w for _, w in worker_samples]})
    path.write_text(json.dumps({"shared": {"frames": FRAMES}, "profiles": profiles}))
    return path


def test_inclusive_seconds_per_function_and_thread(tmp_path):
    f = write(tmp_path / "a.json",
              [([0, 1, 2, 3], 1.5), ([0, 1, 2, 5, 5, 4], 0.5), ([0, 1], 0.25)],  # fastest recursing: counted once
              [([6, 3, 4], 2.0)], workers=3)
    run = profile_summary.load(f)
    main = run["MainThread"]  # the thread whose stacks start at the script: its name is empty in the file
    assert main["(total)"] == 2.25 and main["engine/run.py:main"] == 2.25
    assert main["engine/engine.py:Engine.__init__"] == 2.0 and main["kernels/tuning.py:fastest"] == 0.5
    assert main["compiler/compiler.py:compile"] == 1.5
    assert not any("numpy" in k for k in main)  # neither ours nor a listed library entry point
    assert set(run) == {"MainThread", "compile_*"}  # the pool's three threads add up
    assert run["compile_*"]["compiler/compiler.py:compile"] == 6.0
    text = profile_summary.report(run, min_s=0.3)
    assert text.splitlines()[0] == "MainThread: 2.25 s" and "fastest" in text
    assert "fastest" not in profile_summary.report(run, min_s=0.6)


def test_difference_against_a_base_run(tmp_path):
    first = profile_summary.load(write(tmp_path / "first.json", [([0, 1, 2, 3], 4.0), ([0, 1], 1.0)]))
    warm = profile_summary.load(write(tmp_path / "warm.json", [([0, 1, 2], 1.0), ([0, 1], 1.0)]))
    lines = profile_summary.report(first, warm).splitlines()
    assert lines[0] == "MainThread: 5.00 s against 2.00 s"
    assert lines[1].split()[0] == "+4.00" and lines[1].endswith("compiler/compiler.py:compile")
    assert "+3.00" in profile_summary.report(first, warm)  # (total), main and Engine.__init__ each 3 s more


@pytest.mark.parametrize("text", ["not json", json.dumps({"profiles": []}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_profile_is_refused(tmp_path, capsys, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert profile_summary.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "py-spy record --format speedscope" in err
