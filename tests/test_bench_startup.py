"""tools/bench_startup.py on the CPU: three CLI processes, one JSON; a bad model dir is refused."""

from __future__ import annotations

import json

import pytest

from tools.bench_startup import main


@pytest.mark.slow
def test_three_runs_and_a_summary(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "startup.json"
    rc = main(["--model", str(tiny_qwen2_dir), "--max-new-tokens", "2", "--cache-dir", str(tmp_path / "c"),
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert set(rep["runs"]) == {"first", "cached", "no-cache"}
    assert all(r["rc"] == 0 and r["wall_s"] > 0 and len(r["token_ids"]) == 2 for r in rep["runs"].values())
    assert rep["runs"]["no-cache"]["env"] == {"LAYERSTREAM_TUNING_CACHE": "0"}
    assert rep["summary"]["same_tokens"] is True
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_long_prompt_fresh_triton_cache_two_runs(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "startup.json"
    rc = main(["--model", str(tiny_qwen2_dir), "--max-new-tokens", "2", "--cache-dir", str(tmp_path / "c"),
               "--runs", "first,cached", "--triton-cache", "fresh", "--prompt-words", "40",
               "--max-context", "256", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert list(rep["runs"]) == ["first", "cached"]
    assert all(r["env"]["TRITON_CACHE_DIR"] == rep["triton_cache"] for r in rep["runs"].values())
    assert all(r["stats"]["prompt_tokens"] >= 40 for r in rep["runs"].values())
    assert rep["summary"]["same_tokens"] is True and rep["summary"]["first_over_cached"] > 0
    assert "saved_s" not in rep["summary"]


def test_unknown_run_name_is_refused(tiny_qwen2_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_qwen2_dir), "--runs", "first,warm", "--out", str(tmp_path / "x.json")]) == 2
    assert "--runs" in capsys.readouterr().err


def test_model_without_config_is_refused(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_profiled_runs_leave_a_profile_each(tiny_qwen2_dir, tmp_path, capsys):
    """--profile-dir: each run under py-spy, one speedscope file per run that tools.profile_summary reads."""
    import shutil

    from tools import profile_summary
    if shutil.which("py-spy") is None:
        pytest.skip("py-spy is not installed (pip install -e '.[dev]' brings it)")
    prof = tmp_path / "prof"
    rc = main(["--model", str(tiny_qwen2_dir), "--max-new-tokens", "2", "--cache-dir", str(tmp_path / "c"),
               "--runs", "first,cached", "--profile-dir", str(prof), "--out", str(tmp_path / "s.json")])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in prof.iterdir()) == ["cached.speedscope.json", "first.speedscope.json"]
    first = profile_summary.load(prof / "first.speedscope.json")
    main_thread = first["MainThread"]
    assert main_thread["(total)"] > 0.5  # the whole process, imports included
    assert "engine/run.py:main" in main_thread and main_thread["engine/run.py:main"] <= main_thread["(total)"]
    diff = profile_summary.report(first, profile_summary.load(prof / "cached.speedscope.json"), min_s=0.0)
    assert diff.startswith("MainThread: ") and " vs " in diff


def test_profile_dir_without_py_spy_is_refused(tiny_qwen2_dir, tmp_path, capsys, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["--model", str(tiny_qwen2_dir), "--profile-dir", str(tmp_path / "p"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "py-spy" in capsys.readouterr().err
