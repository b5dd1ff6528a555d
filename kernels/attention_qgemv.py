# Decode attention feeding o_proj's int8-x GEMV (kernels/qgemv_i8.py) with x already rounded: the attention's
# epilogue rounds the rows it writes (kernels/attention_decode.py, ``rounded=True``; kernels.quant_x.round_tile),
# so the GEMV needs no rounding launch of its own, as the norm does for qkv and gate_up (kernels/add_rmsnorm_i8.py)
# and the SwiGLU for down. Why: o_proj's GEMV alone reached 76% of copy on an H100 and 68% on an H200, but 61% and
# 55% with the rounding launch before it (bench/results/2026-12-05-h100-s40/call1/, -h200-s39/call2/).
#
# Shapes:  q [B, Hq, D] (unit stride along D; D a power of two >= 32), k_cache / v_cache [B, Hk, S, D],
#          seq_lens int32 [B]; the weight as kernels/qgemv_i8.py takes it (int4 codes [N, Hq * D / 8], scales,
#          zeros or mins); out [B, N] in q's dtype.
# Reference: the unfused pair, attention_decode then qgemv (the same codes, so the same numbers: the tests).
# Opt-in (LAYERSTREAM_ROUND_IN_ATTENTION=1): timed on an H100 it decoded the 7B AWQ 3.7-4.4% slower with the
# epilogue's store-barrier-reload (sessions 42, 44) and 1-3% slower rounding from registers (session 45,
# bench/results/2026-12-06-h100-s45/call4/): the rounding launch it saves is overlapped by PDL.
from __future__ import annotations

import os

import torch

from kernels.attention_decode import attention_decode, can_round
from kernels.qgemv_i8 import launch_i8, tuned_pick


def enabled() -> bool:
    """Whether decode layers may take this path (``LAYERSTREAM_ROUND_IN_ATTENTION=1``; off by default)."""
    return os.environ.get("LAYERSTREAM_ROUND_IN_ATTENTION", "0").strip().lower() in ("1", "on", "true", "yes")


def attention_qgemv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float, max_seq_len: int | None, w_q: torch.Tensor, w_s: torch.Tensor,
                    w_z: torch.Tensor | None, bits: int, mins: torch.Tensor | None = None) -> torch.Tensor | None:
    """``qgemv(attention_decode(q, ...).view(B, Hq * D), w)`` in two launches instead of three, when the tuner's
    pick for that GEMV is the int8-x one (kernels.qgemv_i8.tuned_pick) and the head dim suits the epilogue; None
    otherwise (the caller runs the attention and the projection)."""
    B, Hq, D = q.shape
    if not can_round(D) or B == 0:
        return None
    pick = tuned_pick(B, Hq * D, q.dtype, q.device, w_q, w_s, w_z, bits, None, mins)
    if pick is None:
        return None
    cfg, group, zz, asm = pick
    attn, rounded = attention_decode(q, k_cache, v_cache, seq_lens, scale, max_seq_len, rounded=True)
    out = torch.empty((B, w_q.shape[0]), device=q.device, dtype=q.dtype)
    launch_i8(cfg, attn.view(B, Hq * D), w_q, w_s, zz, group, None, out, mins is not None, asm, rounded=rounded)
    return out
