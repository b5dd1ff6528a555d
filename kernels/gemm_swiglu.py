# Prefill MLP up-projection fused with its activation: out = silu(x @ gate.T) * (x @ up.T).
#
# Shapes:  x    [M, K]   any row stride, unit stride along K
#          w    [2I, K]  the fused gate_up weight: gate rows 0..I, then up rows I..2I, contiguous
#          out  [M, I]   new contiguous tensor, dtype of x
# Dtypes:  bf16 / fp16 / fp32 (x and w the same); fp32 accumulation.  The epilogue rounds as
#          kernels.gemm followed by kernels.swiglu would: gate and up to the dtype, silu(gate) to the
#          dtype, the product to the dtype (kernels.mma.swiglu_tile).
# Why:     the [M, 2I] gate_up output never exists: a prefill token's MLP activations drop from 3I
#          to I elements (the planner's act_bytes_per_token for dense weights), so the same budget
#          holds a chunk about twice as long (half the group-layers a streamed pass launches).
# Kernels: kernels.gemm's two families (pointer, TMA) with SWIGLU=True: each output tile also
#          loads the up rows of its columns into a second accumulator.
# Config:  the pick of the unfused gate_up GEMM (kernels.gemm, key (M bucket, 2I, K, dtype)) with
#          half the tile's columns, so a tile loads and multiplies the same bytes with the same
#          registers as that pick's: the one kernels.gemm tuned in this process, else a cached or
#          shipped one (kernels/tuned/). A shape with none tunes itself at first use over kernels.gemm's
#          candidates, halved, timed into its own output, and caches the pick as "gemm_swiglu".
from __future__ import annotations

import functools

import torch
import triton

from kernels import gemm, gemm_tma, tuning_cache
from kernels.tuning import fits_l2, tuning_suspended


def _halved(cfg: triton.Config) -> triton.Config:
    """cfg with half the output columns per tile (at least 16: a tensor-core tile's minimum)."""
    kw = dict(cfg.kwargs)
    kw["BLOCK_N"] = max(16, kw["BLOCK_N"] // 2)
    return triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_PICKS: dict[tuple, triton.Config] = {}  # (M bucket, 2I, K, dtype[, "pointer"]) -> halved config


def _config(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, tma_ok: bool) -> triton.Config:
    """This call's config (see the header): remembered per key for the process."""
    (M, K), N = x.shape, w.shape[0]
    key = (min(triton.next_power_of_2(M), 4096), N, K, x.dtype, False)
    if not tma_ok and gemm_tma.device_ok(x):
        key += ("pointer",)
    if (cfg := _PICKS.get(key)) is not None:
        return cfg
    cands = gemm._candidates(x, tma_ok)
    unfused = gemm._TUNED.get(key) or tuning_cache.choose(x.device, "gemm", key, cands)
    if unfused is not None and (tma_ok or not unfused.kwargs.get("TMA")):
        cfg = _halved(unfused)
    else:
        cfg = _tuned(x, w, out, key, [_halved(c) for c in cands])
    if tuning_suspended():  # an untimed answer (compile ahead, graph capture): the real call may tune
        return cfg
    _PICKS[key] = cfg
    return cfg


def _tuned(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, key: tuple,
           cands: list[triton.Config]) -> triton.Config:
    """Where the unfused GEMM has no pick for this shape: this op's own cached pick, else (unless tuning
    is suspended) the fastest of the halved candidates timed into out, else the halved default."""
    default = _halved(gemm._default_config(x.dtype))
    if tuning_suspended():
        return tuning_cache.untimed_pick(x.device, "gemm_swiglu", key, cands, default)
    tune = functools.partial(gemm._pick, cands, lambda c: gemm.launch(c, x, w, None, out, swiglu=True), out,
                             fits_l2(w.nbytes, w.device))
    return tuning_cache.tuned(x.device, "gemm_swiglu", key, cands, tune) or default


def _gemm_swiglu(x: torch.Tensor, w: torch.Tensor, cfg: triton.Config | None) -> torch.Tensor:
    """:func:`gemm_swiglu` with an optional pinned launch config (tests force each family with it)."""
    gemm.check_linear_inputs(x, w, None)
    if w.shape[0] % 2:
        raise ValueError(f"gemm_swiglu: w must be the fused [gate; up] weight [2I, K], got {w.shape[0]} rows (odd)")
    out = torch.empty((x.shape[0], w.shape[0] // 2), device=x.device, dtype=x.dtype)
    tma_ok = gemm_tma.eligible(x, w, out)
    if cfg is not None and cfg.kwargs.get("TMA") and not tma_ok:
        raise ValueError("a TMA config needs capability >= 9 (or the interpreter) and 16-byte "
                         "aligned x / w base pointers and row strides")
    gemm.launch(cfg or _config(x, w, out, tma_ok), x, w, None, out, swiglu=True)
    return out


def gemm_swiglu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``silu(x @ w[:I].T) * (x @ w[I:].T)`` as [M, I] for the fused gate_up weight w [2I, K].

    x: [M, K] (unit stride along K), w: [2I, K] contiguous, one dtype (bf16/fp16/fp32); no bias
    (the MLPs of the supported models have none). Rounded like ``swiglu(gemm(x, w))``.
    """
    return _gemm_swiglu(x, w, None)


def gemm_swiglu_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 torch reference for :func:`gemm_swiglu` (returns float32, no intermediate rounding)."""
    gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
