"""Shipped tuning picks (kernels/tuning_defaults.py): exported from a cache file, used when the user's
cache misses, never over the user's own pick, and only when still a current candidate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import triton

from kernels import tuning_cache as tc
from kernels import tuning_defaults as td
from tools.export_tuning import main as export_main

GPU = torch.device("cuda", 0)
FAKE_GPU = ("NVIDIA H200", (9, 0), 132)
KEY = (16, 4096, 4096, torch.bfloat16, False)
A = triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=4)
B = triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=3)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An enabled user cache for a fake H200 and an empty shipped-defaults directory; returns the latter."""
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "user"))
    monkeypatch.setenv("LAYERSTREAM_TUNING_CACHE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tc, "_device_info", lambda device: FAKE_GPU)
    monkeypatch.setattr(tc, "_CACHES", {})
    shipped = tmp_path / "tuned"
    monkeypatch.setattr(td, "DEFAULTS_DIR", shipped)
    td._entries.cache_clear()
    return shipped


def _cache_file(path: Path, pick: triton.Config) -> Path:
    path.write_text(json.dumps({"gpu": FAKE_GPU[0], "capability": [9, 0], "torch": "2.11", "triton": "3.6",
                                "version": tc.FORMAT_VERSION,
                                "entries": {"gemv": {tc._key_str(KEY): tc.config_to_json(pick)}}}))
    return path


def test_a_shipped_pick_serves_a_first_run(env: Path, tmp_path: Path, capsys) -> None:
    assert tc.choose(GPU, "gemv", KEY, [A, B]) is None and not tc.has_entries(GPU)
    assert export_main([str(_cache_file(tmp_path / "h200.json", B)), "--out-dir", str(env)]) == 0
    assert "NVIDIA_H200.json" in capsys.readouterr().out
    assert tc.has_entries(GPU)  # no "first run tunes" note
    assert tc.choose(GPU, "gemv", KEY, [A, B]) == B
    timed = []
    assert tc.tuned(GPU, "gemv", KEY, [A, B], lambda: timed.append(1) or A) == B and not timed
    assert tc.choose(GPU, "gemv", KEY, [A]) is None  # the shipped pick is no longer a candidate: tune


def test_shipped_picks_can_be_ignored(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERSTREAM_SHIPPED_TUNING=0: the shape is timed and the pick lands in the user's cache (to export)."""
    td.export([_cache_file(tmp_path / "h200.json", B)], env)
    monkeypatch.setenv("LAYERSTREAM_SHIPPED_TUNING", "0")
    assert tc.choose(GPU, "gemv", KEY, [A, B]) is None and not tc.has_entries(GPU)
    timed = []
    assert tc.tuned(GPU, "gemv", KEY, [A, B], lambda: timed.append(1) or A) == A and timed
    assert tc.choose(GPU, "gemv", KEY, [A, B]) == A  # now from the user's cache
    monkeypatch.setenv("LAYERSTREAM_SHIPPED_TUNING", "1")
    assert td.lookup(FAKE_GPU[0], "gemv", tc._key_str(KEY), env) == tc.config_to_json(B)


def test_the_users_pick_wins_and_exports_merge(env: Path, tmp_path: Path) -> None:
    td.export([_cache_file(tmp_path / "old.json", B)], env)
    tc.store(GPU, "gemv", KEY, tc.config_to_json(A))
    assert tc.choose(GPU, "gemv", KEY, [A, B]) == A
    other = (1, 3584, 3584, torch.bfloat16, False)
    newer = json.loads((tmp_path / "old.json").read_text())
    newer["entries"]["gemv"] = {tc._key_str(other): tc.config_to_json(A)}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    td.export([tmp_path / "new.json"], env)
    shipped = json.loads(td.defaults_path(FAKE_GPU[0], env).read_text())["entries"]["gemv"]
    assert set(shipped) == {tc._key_str(KEY), tc._key_str(other)}


def test_bad_inputs(env: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "x.json").write_text("{}")
    assert export_main([str(tmp_path / "x.json"), "--out-dir", str(env)]) == 2
    assert "not a kernel tuning-cache file" in capsys.readouterr().err
    env.mkdir()
    td.defaults_path(FAKE_GPU[0], env).write_text("not json")
    assert td.lookup(FAKE_GPU[0], "gemv", tc._key_str(KEY), env) is None  # a broken shipped file: tune


def _gemv_candidates(key: list) -> list[triton.Config]:
    from kernels import gemv
    block_m, n, k, dtype = key[:4]
    return gemv._candidates(block_m, n, k, getattr(torch, dtype.removeprefix("torch.")).itemsize, 132)


def _qgemv_candidates(key: list) -> list[triton.Config]:
    from kernels import qgemv
    block_m, n, k, group, bits = key[:5]
    return qgemv._candidates(block_m, n, k, 132, group, bits, int8_x=bool(key[-1]))


def _gemm_candidates(key: list) -> list[triton.Config]:
    from kernels import gemm, gemm_tma
    return gemm._configs() + gemm_tma.candidates(getattr(torch, key[3].removeprefix("torch.")).itemsize)


def _qgemm_candidates(key: list) -> list[triton.Config]:
    from kernels import qgemm
    return qgemm._configs(key[3], key[4])


def _attention_prefill_candidates(key: list) -> list[triton.Config]:
    from kernels import attention_prefill
    return attention_prefill._configs()


@pytest.mark.parametrize("kernel,candidates", [("gemm", _gemm_candidates), ("qgemm", _qgemm_candidates),
                                               ("attention_prefill", _attention_prefill_candidates)])
def test_the_shipped_prefill_picks_are_still_candidates(kernel: str, candidates,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The H100's shipped prompt-pass picks (the served 7B AWQ's warm-up, bench/results/2026-12-06-h100-s45/call5)
    are each one of the tuner's current candidates for their key, as the GEMV picks above."""
    from kernels import attention_prefill, gemm, qgemm
    for mod in (attention_prefill, gemm, qgemm):
        monkeypatch.setattr(mod, "_INTERPRET", False)
    shipped = json.loads(td.defaults_path("NVIDIA H100 80GB HBM3").read_text())["entries"][kernel]
    assert shipped
    for key, pick in shipped.items():
        assert any(tc.config_to_json(c) == pick for c in candidates(json.loads(key))), (key, pick)


def test_the_shipped_attention_decode_picks_are_still_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shipped decode attention pick (a split count and a config) is among the tuner's pairs' configs."""
    from kernels import attention_decode
    monkeypatch.setattr(attention_decode, "_INTERPRET", False)
    for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        for key, (splits, pick) in json.loads(td.defaults_path(gpu).read_text())["entries"].get(
                "attention_decode", {}).items():
            assert any(tc.config_to_json(c) == pick for c in attention_decode._configs(fused=splits > 1)), (key, pick)


@pytest.mark.parametrize("gpu,kernel,candidates", [("NVIDIA H200", "gemv", _gemv_candidates),
                                                   ("NVIDIA H200", "qgemv", _qgemv_candidates),
                                                   ("NVIDIA H100 80GB HBM3", "gemv", _gemv_candidates),
                                                   ("NVIDIA H100 80GB HBM3", "qgemv", _qgemv_candidates)])
def test_the_shipped_gemv_picks_are_still_candidates(gpu: str, kernel: str, candidates,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each dense and int4 GEMV pick shipped for the H200 and the H100 (132 SMs each) is one of the tuner's current
    candidates for its key: a change to the candidates that drops one makes a first run there tune that shape again."""
    from kernels import gemv, qgemv, qgemv_candidates
    for mod in (gemv, qgemv, qgemv_candidates):
        monkeypatch.setattr(mod, "_INTERPRET", False)
    shipped = json.loads(td.defaults_path(gpu).read_text())["entries"][kernel]
    assert shipped
    for key, pick in shipped.items():
        assert any(tc.config_to_json(c) == pick for c in candidates(json.loads(key))), (key, pick)
