"""The prompt attention's untimed config, built for sm_90 on the CPU with Triton's bundled ptxas: it must spill
nothing (short prompt groups, <= 64 rows, run it untuned in every served pass). Its strides are compiled 16-aligned,
as Triton specializes them at a launch over a fused qkv output and a KV cache. The kernel's one-launch form for
stacked slices (VARLEN) is built too."""
from __future__ import annotations

import pytest

from tests.test_kernels_ggml import NV_BIN, sm90_report

ALIGNED = ("D", "S", "sq_b", "sq_t", "sq_h", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s", "so_b", "so_t", "so_h")


def report() -> None:
    """One line per head dim and form: ``D=d VARLEN=v: <resource line>`` (run with TRITON_INTERPRET=0)."""
    import torch

    from kernels import attention_prefill as ap
    from tests.test_kernels_qgemv_sm90 import compile_sm90
    cfg = ap._default_config(torch.bfloat16)
    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptrs.update(start_ptr="*i32", qlen_ptr="*i32", qrow_ptr="*i32", crow_ptr="*i32", qk_scale="fp32")
    for d in (128, 64):
        for varlen in (False, True):
            meta = dict(cfg.kwargs, BLOCK_D=d, IS_FP32=False, UPCAST=False, VARLEN=varlen)
            usage, _ = compile_sm90(ap._attention_prefill_kernel, ptrs, meta, cfg.num_warps, cfg.num_stages,
                                    aligned_ints=ALIGNED)
            print(f"D={d} VARLEN={varlen}: {usage}", flush=True)


@pytest.mark.slow
@pytest.mark.skipif(not (NV_BIN / "cuobjdump").exists(), reason="Triton's NVIDIA tools are not bundled")
def test_untimed_prefill_attention_config_spills_nothing_on_sm90() -> None:
    lines = [line for line in sm90_report("from tests.test_kernels_attention_prefill_sm90 import report; report()")
             if line.startswith("D=")]
    assert len(lines) == 4, lines
    for line in lines:
        assert "STACK:0" in line and "LOCAL:0" in line, line
