"""Tests for the on-disk cache of the kernels' tuning results (kernels/tuning_cache.py).

The cache is only active for CUDA devices outside the interpreter; the CPU tests fake a GPU by
patching ``_device_info`` and clearing TRITON_INTERPRET while no kernel runs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import triton

from kernels import gemv as gemv_mod
from kernels import rope
from kernels import tuning_cache as tc
from tests.kernel_utils import INTERPRET, needs_cuda, rand, rel_err
from tests.test_kernels_rope import _rope_case

GPU = torch.device("cuda", 0)
FAKE_GPU = ("NVIDIA H100 80GB HBM3", (9, 0), 132)
KEY = (16, 4096, 4096, torch.bfloat16, False)
CFG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "SWAP_AB": True, "TICKET": False},
                    num_warps=8, num_stages=4)


@pytest.fixture
def cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An enabled cache under tmp_path for a fake H100, with no file loaded yet in this process and the picks
    shipped for the H100 (kernels/tuned/) ignored."""
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("LAYERSTREAM_TUNING_CACHE", "1")
    monkeypatch.setenv("LAYERSTREAM_SHIPPED_TUNING", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tc, "_device_info", lambda device: FAKE_GPU)
    monkeypatch.setattr(tc, "_CACHES", {})
    return tmp_path / "tuning"


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_config_json_round_trip() -> None:
    d = json.loads(json.dumps(tc.config_to_json(CFG)))  # through a file's text
    back = tc.config_from_json(d)
    assert back == CFG and list(back.kwargs.items()) == list(CFG.kwargs.items())
    assert (back.num_warps, back.num_stages) == (8, 4) and back.kwargs["SWAP_AB"] is True
    for bad in (None, [], {"kwargs": {}}, {"kwargs": [], "num_warps": 4, "num_stages": 1},
                {"kwargs": {"B": [1]}, "num_warps": 4, "num_stages": 1},
                {"kwargs": {}, "num_warps": "4", "num_stages": 1},
                {"kwargs": {}, "num_warps": 4, "num_stages": True}):
        with pytest.raises(ValueError):
            tc.config_from_json(bad)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LAYERSTREAM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tc.cache_dir() == tmp_path / "home" / ".cache" / "layerstream" / "tuning"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tc.cache_dir() == tmp_path / "xdg" / "layerstream" / "tuning"
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "ls"))
    assert tc.cache_dir() == tmp_path / "ls" / "tuning"


def test_fingerprint_changes_with_versions_and_kernel_sources(tmp_path: Path) -> None:
    src = tmp_path / "kernels"
    shutil.copytree(Path(tc.__file__).parent, src, ignore=shutil.ignore_patterns("__pycache__"))
    digest = tc.source_digest(src)
    base = ("NVIDIA H100 80GB HBM3", (9, 0), 132, "2.13.0", "3.9.0", digest)
    stem = tc.file_stem(*base)
    assert re.fullmatch(r"NVIDIA_H100_80GB_HBM3-[0-9a-f]{16}", stem) and stem == tc.file_stem(*base)
    for i, other in ((1, (8, 0)), (2, 114), (3, "2.14.0"), (4, "3.10.0")):
        assert tc.file_stem(*base[:i], other, *base[i + 1:]) != stem
    assert tc.file_stem("NVIDIA H200", *base[1:]).startswith("NVIDIA_H200-")
    (src / "gemv.py").write_text((src / "gemv.py").read_text() + "\n# changed\n")
    assert tc.source_digest(src) != digest
    assert tc.file_stem(*base[:5], tc.source_digest(src)) != stem


def test_store_then_lookup_in_a_fresh_process(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tc.lookup(GPU, "gemv", KEY) is None
    tc.store(GPU, "gemv", KEY, tc.config_to_json(CFG))
    assert tc.lookup(GPU, "gemv", KEY) == tc.config_to_json(CFG)
    tc.store(GPU, "rope", KEY, (1, 32, 4))
    assert tc.lookup(GPU, "rope", KEY) == [1, 32, 4]  # as a later process reads it back
    (name,) = _files(cache_root)  # one file, no temp file left
    assert re.fullmatch(r"NVIDIA_H100_80GB_HBM3-[0-9a-f]{16}\.json", name)
    content = json.loads((cache_root / name).read_text())
    assert content["version"] == tc.FORMAT_VERSION and content["gpu"] == FAKE_GPU[0]
    assert list(content["entries"]["gemv"]) == ['[16, 4096, 4096, "torch.bfloat16", false]']
    monkeypatch.setattr(tc, "_CACHES", {})  # a new process reads the file
    assert tc.config_from_json(tc.lookup(GPU, "gemv", KEY)) == CFG
    assert tc.lookup(GPU, "gemm", KEY) is None and tc.lookup(GPU, "gemv", KEY[:-1] + (True,)) is None


def test_disabled_by_env_off_cuda_and_in_the_interpreter(cache_root: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value, device in (("LAYERSTREAM_TUNING_CACHE", "0", GPU), ("TRITON_INTERPRET", "1", GPU),
                               ("LAYERSTREAM_TUNING_CACHE", "1", torch.device("cpu"))):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            tc.store(device, "gemv", KEY, tc.config_to_json(CFG))
            assert tc.lookup(device, "gemv", KEY) is None
    assert not cache_root.exists()
    tc.store(GPU, "gemv", KEY, tc.config_to_json(CFG))  # enabled again: stored
    assert len(_files(cache_root)) == 1


def test_two_processes_keep_each_others_entries(tmp_path: Path) -> None:
    path = tmp_path / "gpu-0123456789abcdef.json"
    a, b = tc.TuningCache(path), tc.TuningCache(path)
    assert a.get("gemv", "k1") is None and b.get("gemv", "k2") is None  # both loaded the empty state
    a.put("gemv", "k1", 1)
    b.put("gemv", "k2", 2)
    b.put("rope", "k3", [1, 32, 4])
    a.put("gemm", "k4", 4)
    fresh = tc.TuningCache(path)
    assert [fresh.get(*k) for k in (("gemv", "k1"), ("gemv", "k2"), ("rope", "k3"), ("gemm", "k4"))] \
        == [1, 2, [1, 32, 4], 4]
    assert _files(tmp_path) == [path.name]


@pytest.mark.parametrize("content", ["{not json", '{"version": 999, "entries": {}}', '["a list"]', "\xff"])
def test_corrupt_file_is_ignored_then_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                content: str) -> None:
    path = tmp_path / "gpu.json"
    path.write_bytes(content.encode("latin-1"))
    cache = tc.TuningCache(path)
    with caplog.at_level(logging.WARNING, logger=tc.__name__):
        assert cache.get("gemv", "k") is None
        cache.put("gemv", "k", 7)
    assert len(_warnings(caplog)) == 1 and "will be rewritten" in _warnings(caplog)[0]
    assert tc.TuningCache(path).get("gemv", "k") == 7
    assert _files(tmp_path) == ["gpu.json"]


def test_unwritable_dir_warns_once_and_keeps_entries_in_memory(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the directory should be: mkdir fails, also as root
    cache = tc.TuningCache(blocker / "tuning" / "gpu.json")
    with caplog.at_level(logging.WARNING, logger=tc.__name__):
        cache.put("gemv", "k1", 1)
        cache.put("gemv", "k2", 2)
    assert len(_warnings(caplog)) == 1 and "cannot write" in _warnings(caplog)[0]
    assert (cache.get("gemv", "k1"), cache.get("gemv", "k2")) == (1, 2)
    assert _files(tmp_path) == ["not-a-dir"]


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    cache = tc.TuningCache(tmp_path / "gpu.json")
    with caplog.at_level(logging.WARNING, logger=tc.__name__):
        cache.put("gemv", "k", 1)
    assert _files(tmp_path) == [] and "disk full" in _warnings(caplog)[0]
    assert cache.get("gemv", "k") == 1


def test_unserialisable_value_is_not_stored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tc.TuningCache(tmp_path / "gpu.json")
    with caplog.at_level(logging.WARNING, logger=tc.__name__):
        cache.put("gemv", "k", CFG)  # a Config, not its JSON
    assert cache.get("gemv", "k") is None and _warnings(caplog) and _files(tmp_path) == []


def test_bad_cached_value_is_a_miss(cache_root: Path) -> None:
    cands = [CFG, triton.Config({"BLOCK_N": 8, "BLOCK_K": 512, "SPLIT_K": 1}, num_warps=4, num_stages=1)]
    for bad in ("garbage", [1, 2], {"kwargs": 5}, {**tc.config_to_json(CFG), "num_warps": 2}):
        tc.store(GPU, "gemv", KEY, bad)
        assert tc.choose(GPU, "gemv", KEY, cands) is None
        assert tc.tuned(GPU, "gemv", KEY, cands, lambda: cands[1]) is cands[1]  # tuned again
        assert tc.lookup(GPU, "gemv", KEY) == tc.config_to_json(cands[1])  # and replaced
    assert tc.choose(GPU, "gemv", KEY, cands) is cands[1]


def test_tuned_times_once_across_processes(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed pick is stored and reused by a later process; a single choice or a failed tuning
    (None) is not stored; plain values (rope's tuples) round-trip through their encoding."""
    calls: list[str] = []

    def tune(result):
        return lambda: calls.append("t") or result

    cands = [(1, 32, 4), (2, 16, 8)]
    assert tc.tuned(GPU, "rope", KEY, cands, tune(cands[1]), list) == cands[1]
    monkeypatch.setattr(tc, "_CACHES", {})
    assert tc.tuned(GPU, "rope", KEY, cands, tune(cands[0]), list) is cands[1] and calls == ["t"]
    assert tc.tuned(GPU, "rope", (1,), cands, tune(None), list) is None
    assert tc.tuned(GPU, "rope", (2,), cands[:1], tune(cands[0]), list) == cands[0]
    assert tc.lookup(GPU, "rope", (1,)) is None and tc.lookup(GPU, "rope", (2,)) is None


def test_lookup_and_store_never_raise(cache_root: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    def broken(device):
        raise RuntimeError("no device properties")

    monkeypatch.setattr(tc, "_device_info", broken)
    with caplog.at_level(logging.WARNING, logger=tc.__name__):
        assert tc.lookup(GPU, "gemv", KEY) is None
        tc.store(GPU, "gemv", KEY, 1)
    assert len(_warnings(caplog)) == 2


def test_rope_reuses_the_cached_launch_shape(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rope tuner stores its timed pick; a later process applies it without timing."""
    if INTERPRET:  # kernels still run in the interpreter; the cache is forced on
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tc, "enabled", lambda device: True)
    monkeypatch.setattr(rope, "_TUNED", {})
    monkeypatch.setattr(rope, "_tunable", lambda q: True)
    sms = rope._num_sms(0) if torch.cuda.is_available() else 1
    cands = rope._candidates(10, 4, 32, 4, sms)
    monkeypatch.setattr(rope, "graph_ms", lambda fn: 1.0 if fn.__defaults__[0] == cands[-1] else 2.0)
    q, k, _, cos, sin, pos = _rope_case(2, 5, 3, 1, 64, torch.float32)
    q_ref, k_ref = rope.apply_rope_ref(q, k, cos, sin, pos)
    rope.apply_rope_(q, k, cos, sin, pos)
    assert rope._TUNED == {(16, 3, 1, 64, torch.float32): cands[-1]}
    assert tc.lookup(GPU, "rope", (16, 3, 1, 64, torch.float32)) == list(cands[-1])

    def no_timing(fn):
        raise AssertionError("rope timed candidates despite a cached launch shape")

    monkeypatch.setattr(rope, "_TUNED", {})
    monkeypatch.setattr(tc, "_CACHES", {})  # as in a new process
    monkeypatch.setattr(rope, "graph_ms", no_timing)
    q2, k2, _, cos, sin, pos = _rope_case(2, 5, 3, 1, 64, torch.float32)
    rope.apply_rope_(q2, k2, cos, sin, pos)
    assert rope._TUNED == {(16, 3, 1, 64, torch.float32): cands[-1]}
    torch.testing.assert_close(q2.float(), q_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2.float(), k_ref.float(), rtol=1e-5, atol=1e-5)


@needs_cuda
def test_gemv_reuses_the_cached_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A tuned gemv shape lands in the cache file; a later process uses it without timing."""
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("LAYERSTREAM_TUNING_CACHE", "1")
    monkeypatch.setenv("KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(tc, "_CACHES", {})
    monkeypatch.setattr(gemv_mod, "_TUNED", {})
    x, w = rand(1, 2048, dtype=torch.bfloat16), rand(3072, 2048, dtype=torch.bfloat16, seed=1) * 0.02
    ref = gemv_mod.gemv_ref(x, w)
    assert rel_err(gemv_mod.gemv(x, w), ref) < 1e-2
    (path,) = (tmp_path / "tuning").iterdir()
    entries = json.loads(path.read_text())["entries"]["gemv"]
    assert list(entries) == ['[1, 3072, 2048, "torch.bfloat16", false]']
    tuned_cfg = next(iter(gemv_mod._TUNED.values()))

    def no_timing(*args, **kwargs):
        raise AssertionError("gemv timed candidates despite a cached config")

    monkeypatch.setattr(gemv_mod, "_TUNED", {})
    monkeypatch.setattr(tc, "_CACHES", {})  # as in a new process
    monkeypatch.setattr(gemv_mod, "_pick", no_timing)
    assert rel_err(gemv_mod.gemv(x, w), ref) < 1e-2
    assert list(gemv_mod._TUNED.values()) == [tuned_cfg]


def test_has_entries_after_a_store(cache_root: Path) -> None:
    assert tc.enabled(GPU) and not tc.has_entries(GPU)
    tc.store(GPU, "gemv", (1, 2), {"x": 1})
    assert tc.has_entries(GPU)
    assert not tc.has_entries(torch.device("cpu"))


def test_a_failed_tuning_is_neither_raised_nor_stored(monkeypatch):
    """Tuning that runs out of memory under the allocator cap (or finds no candidate) gives None and
    stores nothing; the caller runs its default (kernels.tuning_cache.tuned)."""
    from kernels import tuning_cache as tc

    stored = []
    monkeypatch.setattr(tc, "choose", lambda *a, **k: None)
    monkeypatch.setattr(tc, "store", lambda *a: stored.append(a))

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 MiB")

    def none_ran():
        raise tc_tuning.NoCandidate("gemm: no candidate config could be compiled")

    from kernels import tuning as tc_tuning
    dev = torch.device("cpu")
    assert tc.tuned(dev, "gemm", ("k",), ["a", "b"], oom, str) is None
    assert tc.tuned(dev, "gemm", ("k",), ["a", "b"], none_ran, str) is None
    assert not stored
    assert tc.tuned(dev, "gemm", ("k",), ["a", "b"], lambda: "b", str) == "b" and len(stored) == 1
