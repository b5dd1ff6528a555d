"""kernels/ggml_tuned.py: the H200's measured ggml_gemv configs are valid launch overrides, picked by
type, rows and shape on sm_90 only (tests/test_kernels_ggml_config.py runs such overrides, split-K too,
in the interpreter against the reference)."""

from __future__ import annotations

import pytest
import torch

from kernels import ggml_tuned
from kernels.ggml_blocks import BLOCKS
from kernels.ggml_gemv import check_config


def test_every_entry_is_a_valid_config_of_a_swept_type():
    for (qtype, m, shape), (block_n, warps, split) in ggml_tuned.SM90.items():
        assert qtype in BLOCKS and m in (1, 4, 16) and shape in ("kv", "wide", "deep", "square")
        check_config({"BLOCK_N": block_n, "num_warps": warps, "SPLIT_K": split})
    assert set(ggml_tuned.NEAREST) == set(BLOCKS)  # every block type the kernel takes has a swept neighbour


@pytest.mark.parametrize("n,k,want", [(512, 3584, "kv"), (18944, 3584, "wide"), (3584, 18944, "deep"),
                                      (3584, 3584, "square"), (8192, 29568, "deep")])
def test_shape_classes(n, k, want):
    assert ggml_tuned.shape_class(n, k) == want


def test_pick_only_on_sm90_and_not_for_fp32(monkeypatch):
    cpu = torch.device("cpu")
    assert ggml_tuned.pick("q4_k", 1, 3584, 18944, torch.bfloat16, cpu) is None
    monkeypatch.setattr(ggml_tuned, "_sm90", lambda dev: True)
    got = ggml_tuned.pick("q4_k", 1, 3584, 18944, torch.bfloat16, cpu)
    assert got == dict(zip(("BLOCK_N", "num_warps", "SPLIT_K"), ggml_tuned.SM90[("q4_k", 1, "deep")]))
    assert ggml_tuned.pick("q4_k", 1, 3584, 18944, torch.float32, cpu) is None
    assert ggml_tuned.pick("q5_k", 3, 512, 3584, torch.float16, cpu) == dict(
        zip(("BLOCK_N", "num_warps", "SPLIT_K"), ggml_tuned.SM90[("q6_k", 4, "kv")]))
    # Q8_0 was swept at 1 and 4 rows only: 16 rows take its 4-row pick
    assert ggml_tuned.pick("q8_0", 12, 18944, 3584, torch.bfloat16, cpu)["BLOCK_N"] == \
        ggml_tuned.SM90[("q8_0", 4, "wide")][0]
    assert ggml_tuned.pick("q4_k", 17, 18944, 3584, torch.bfloat16, cpu) is None  # rows never swept
