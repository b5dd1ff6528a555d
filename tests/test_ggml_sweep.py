"""Tests for bench/ggml_sweep.py, the ggml_gemv launch sweep of bench/probe_qkernels.py --ggml-sweep.

The GPU timing (kernels.tuning.graph_ms) and copy rate are replaced by fixed numbers; the kernel
itself runs under TRITON_INTERPRET=1 on a small shape, so the correctness gate and the failure
reports are real.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import ggml_sweep  # noqa: E402
from kernels.ggml_gemv import check_config  # noqa: E402

from tests.kernel_utils import DEV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_candidates_split_only_short_grids() -> None:
    """12 BLOCK_N x num_warps everywhere; SPLIT_K only while the grid is short of 4 programs an SM
    (132 SMs: 528) and every split keeps 2 steps."""
    for proj, k, n in ggml_sweep.SWEEP_SHAPES + ggml_sweep.LEGACY_SHAPES:
        cands = ggml_sweep.candidates("q4_k", 1, k, n, 132)
        assert all(check_config(c) for c in cands)
        assert len([c for c in cands if "SPLIT_K" not in c]) == 12, proj
    kv = ggml_sweep.candidates("q4_k", 1, 3584, 512, 132)  # 14 super-blocks: splits up to 4 (8 keeps < 2 steps)
    assert {c.get("SPLIT_K", 1) for c in kv} == {1, 2, 4}
    assert len(kv) == 12 + 4 * 3 * 2
    up = ggml_sweep.candidates("q4_k", 16, 3584, 18944, 132)  # 296 tiles of 64 rows: split 2 only there
    assert {(c["BLOCK_N"], c["SPLIT_K"]) for c in up if "SPLIT_K" in c} == {(64, 2)}
    assert not [c for c in ggml_sweep.candidates("q6_k", 1, 512, 512, 132) if "SPLIT_K" in c]  # 2 steps


def test_register_caps_copy_the_m1_candidates_only() -> None:
    plain = ggml_sweep.candidates("q4_k", 1, 3584, 512, 132)
    capped = ggml_sweep.candidates("q4_k", 1, 3584, 512, 132, (64, 96))
    assert capped[:len(plain)] == plain and len(capped) == 3 * len(plain) and all(check_config(c) for c in capped)
    assert {c.get("maxnreg") for c in capped} == {None, 64, 96}
    assert [c for c in capped if c.get("maxnreg") == 64] == [{**c, "maxnreg": 64} for c in plain]
    assert ggml_sweep.candidates("q4_k", 16, 3584, 512, 132, (64,)) == ggml_sweep.candidates("q4_k", 16, 3584, 512, 132)
    assert ggml_sweep.cfg_str({"BLOCK_N": 16, "num_warps": 8, "SPLIT_K": 2, "maxnreg": 64}) == "BN16 w8 sk2 r64"


def test_sweep_case_checks_times_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate is run and checked; a wrong result and a bad config are reported, not timed;
    the fastest correct candidate is the best, the fixed launch is timed beside it."""
    cands = [{"BLOCK_N": 8, "num_warps": 2}, {"BLOCK_N": 12, "num_warps": 2}, {"BLOCK_N": 32, "num_warps": 4},
             {"BLOCK_N": 16, "num_warps": 4, "SPLIT_K": 2}]
    times = iter([9.0, 7.0, 5.0])  # ms: fixed, BN8, split
    real = ggml_sweep.ggml_gemv

    def gemv(x, blocks, qtype, out, config):
        real(x, blocks, qtype, out=out, config=config)
        if config == {"BLOCK_N": 32, "num_warps": 4}:
            out.zero_()  # a candidate computing garbage

    monkeypatch.setattr(ggml_sweep, "candidates", lambda *a: cands)
    monkeypatch.setattr(ggml_sweep, "ggml_gemv", gemv)
    monkeypatch.setattr(ggml_sweep, "graph_ms", lambda fn, cold: (fn(), next(times))[1])
    monkeypatch.setattr(ggml_sweep, "copy_gbps", lambda nbytes, device: 100.0)
    monkeypatch.setattr(ggml_sweep, "fits_l2", lambda nbytes, device: False)
    row = ggml_sweep.sweep_case("q4_k", "tiny", 512, 24, 3, 132, time.perf_counter() + 600, device=DEV)
    assert row["timed"] == 3 and row["block_bytes"] == 24 * 2 * 144
    assert row["best"]["config"] == cands[3] and row["best"]["us"] == 5000.0
    assert row["fixed"]["config"] is None and row["fixed"]["us"] == 9000.0
    assert row["best"]["of_copy"] == pytest.approx(24 * 2 * 144 / 5000.0 / 1e3 / 100.0)
    assert row["best"]["rel_err"] < ggml_sweep.MAX_REL_ERR
    assert [f.split(":")[0] for f in row["failed"]] == ["BN12 w2", "BN32 w4"]
    assert "ValueError" in row["failed"][0] and "rel err 1.00e+00" in row["failed"][1]
    assert set(row["all_us"]) == {"fixed", "BN8 w2", "BN16 w4 sk2"}


def test_sweep_stops_at_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The case running when the budget runs out finishes; the rest are listed as skipped."""
    monkeypatch.setattr(ggml_sweep.torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(multi_processor_count=132))

    def case(qtype, proj, k, n, m, sms, deadline, caps=()):
        time.sleep(0.05)
        timed = [(2.0, None, 1e-3), (1.0, {"BLOCK_N": 32, "num_warps": 4}, 1e-3)]
        return ggml_sweep.summarize(qtype, proj, k, n, m, 1000, 50.0, timed, ["BN8 w2: rel err 1.00e+00"])

    monkeypatch.setattr(ggml_sweep, "sweep_case", case)
    res = ggml_sweep.run_sweep(["q4_k", "q8_0"], [1, 4], budget_s=0.01)
    assert len(res["rows"]) == 1 and res["best"] == {"q4_k/M1/N3584/K3584": {"BLOCK_N": 32, "num_warps": 4}}
    assert len(res["skipped"]) == 4 + 5 + 4 + 5 - 1 and res["skipped"][-1] == "q8_0 down72b M=4"
    text = ggml_sweep.sweep_table(res)
    assert "BN32 w4" in text and "skipped 17 cases" in text and "failed: q4_k q_o M=1: BN8 w2" in text


def test_probe_cli_parses_on_the_cpu() -> None:
    """--help works without a GPU; bad sweep arguments give one error line and exit 2."""
    probe = [sys.executable, str(ROOT / "bench" / "probe_qkernels.py")]
    ok = subprocess.run([*probe, "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--ggml-sweep" in ok.stdout and "--budget-s" in ok.stdout
    for bad, msg in ((["--sweep-batches", "0,65"], "each in 1..64"), (["--budget-s", "0"], "must be > 0"),
                     (["--sweep-qtypes", "q2_k"], "--sweep-qtypes must name"),
                     (["--sweep-caps", "64,x"], "--sweep-caps must be"), (["--sweep-caps", "100"], "multiple of 8")):
        run = subprocess.run([*probe, "--ggml-sweep", *bad], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and msg in run.stderr and "Traceback" not in run.stderr
