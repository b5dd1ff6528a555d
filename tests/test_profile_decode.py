"""tools/profile_decode.py: kinds by kernel name, and a CPU run of the tiny model end to end."""

from __future__ import annotations

import json

import pytest

from tools import profile_decode


@pytest.mark.parametrize("name,kind", [
    ("_quant_x_kernel", "x to int8 (int8-x GEMV)"), ("_qgemv_i8_kernel", "int4 GEMV, int8 x"),
    ("_qgemv_kernel", "int4/int8 GEMV"), ("_attention_decode_kernel", "attention"),
    ("_add_rmsnorm_kernel", "norms"), ("_rope_kernel", "rope"), ("_kv_append_kernel", "KV append"),
    ("nvjet_tst_128x8_64x12_2x1_v_bz_TNT", "dense GEMV/GEMM"), ("_gemv_kernel", "dense GEMV/GEMM"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"), ("_swiglu_kernel", "swiglu"), ("something_else", "other"),
])
def test_kind_of(name: str, kind: str) -> None:
    assert profile_decode.kind_of(name) == kind


@pytest.mark.parametrize("spans,covered", [
    ([], 0.0), ([(0, 5)], 5.0), ([(0, 5), (5, 7)], 7.0), ([(0, 5), (3, 7)], 7.0), ([(3, 7), (0, 5)], 7.0),
    ([(0, 10), (2, 3), (4, 6)], 10.0), ([(0, 2), (4, 6), (5, 9)], 7.0),
])
def test_covered_counts_overlaps_once(spans, covered) -> None:
    """Under PDL a kernel's span starts inside the one before: the covered time counts that overlap once."""
    assert profile_decode.covered_us(spans) == covered


def test_a_cpu_run_reports_its_steps(tiny_qwen2_dir, tmp_path, capsys) -> None:
    out = tmp_path / "prof.json"
    assert profile_decode.main(["--model", str(tiny_qwen2_dir), "--device", "cpu", "--steps", "3",
                                "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "batch 1, 3 steps:" in text and "CPU ops (self time)" in text
    res = json.loads(out.read_text())
    assert res["steps"] == 3 and res["step_ms"] > 0 and not res["gpu"] and res["covered_ms"] is None
    assert res["rows"] and all(r["us_per_step"] >= 0 for r in res["rows"])
    assert res["rows"] == sorted(res["rows"], key=lambda r: -r["us_per_step"])


def test_bad_arguments_get_an_error(tiny_qwen2_dir, capsys) -> None:
    assert profile_decode.main(["--model", str(tiny_qwen2_dir), "--device", "cpu", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert profile_decode.main(["--model", str(tiny_qwen2_dir), "--device", "cpu", "--vram-budget", "lots"]) == 2
    assert "error:" in capsys.readouterr().err
