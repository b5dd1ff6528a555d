# Next-token selection on the device (no full-vocab host copy).
#
# argmax:  logits [B, V] (row stride arbitrary, last dim contiguous; bf16/fp16/fp32) -> int64 [B].
#          Triton two-stage reduction: stage 1 grid (B, NB) reduces BLOCK-wide chunks to
#          (max, lowest index of max, has-NaN) partials [B, NB]; stage 2 grid (B,) reduces the
#          partials.  Ties -> lowest index; a NaN wins (first NaN), like torch.argmax.
# sample:  logits [B, V] any float dtype -> int64 [B].  HF warper order on fp32 scores:
#          temperature -> top_k -> top_p -> min_p, then a multinomial draw over the surviving
#          candidates (sorted descending on the device: torch.topk for top_k > 0, torch.sort
#          over the full vocab for top_k == 0).
# filtered_probs / sample_ref: the filtered distribution [B, V] fp32 (implementation / HF-style
#          reference) so tests can check the filtering exactly.
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.draw import draw

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ARGMAX_BLOCK = 4096
_TIE_MARGIN = 64  # extra top_k candidates fetched so ties at the k-th value are kept (HF keeps them)


@triton.jit
def _argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, nan_ptr, V, stride_row, NB, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(x_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    is_nan = x != x
    nan_idx = tl.min(tl.where(is_nan, offs, V), axis=0)
    x = tl.where(is_nan, float("-inf"), x)
    m = tl.max(x, axis=0)
    best = tl.min(tl.where((x == m) & mask, offs, V), axis=0)
    has_nan = nan_idx < V
    out = row * NB + blk
    tl.store(val_ptr + out, m)
    tl.store(idx_ptr + out, tl.where(has_nan, nan_idx, best))
    tl.store(nan_ptr + out, has_nan.to(tl.int32))


@triton.jit
def _argmax_final_kernel(val_ptr, idx_ptr, nan_ptr, out_ptr, V, NB, BLOCK_NB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_NB)
    mask = offs < NB
    v = tl.load(val_ptr + row * NB + offs, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * NB + offs, mask=mask, other=V)
    f = tl.load(nan_ptr + row * NB + offs, mask=mask, other=0)
    nan_idx = tl.min(tl.where(f != 0, i, V), axis=0)
    m = tl.max(v, axis=0)
    best = tl.min(tl.where((v == m) & mask, i, V), axis=0)
    res = tl.where(nan_idx < V, nan_idx, best)
    tl.store(out_ptr + row, res.to(tl.int64))


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{name}: logits must be 2-D [B, V] with V > 0, got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: unsupported logits dtype {logits.dtype}")


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of ``logits`` [B, V] -> int64 [B]; ties resolve to the lowest index."""
    _check_logits(logits, "argmax")
    if logits.stride(1) != 1:
        raise ValueError(f"argmax: logits' last dim must be contiguous, got strides {logits.stride()}")
    if os.environ.get("TRITON_INTERPRET") != "1" and logits.device.type != "cuda":
        raise ValueError(f"argmax: logits must be a CUDA tensor (got {logits.device})")
    bsz, vocab = logits.shape
    if vocab >= 2**31 - 1:
        raise ValueError(f"argmax: vocab size {vocab} too large")
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz == 0:
        return out
    block = min(triton.next_power_of_2(vocab), _ARGMAX_BLOCK)
    nb = triton.cdiv(vocab, block)
    vals = torch.empty((bsz, nb), dtype=torch.float32, device=logits.device)
    idxs = torch.empty((bsz, nb), dtype=torch.int32, device=logits.device)
    nans = torch.empty((bsz, nb), dtype=torch.int32, device=logits.device)
    _argmax_partial_kernel[(bsz, nb)](
        logits, vals, idxs, nans, vocab, logits.stride(0), nb, BLOCK=block, num_warps=8 if block >= 2048 else 4
    )
    _argmax_final_kernel[(bsz,)](vals, idxs, nans, out, vocab, nb, BLOCK_NB=triton.next_power_of_2(nb))
    return out


def _check_params(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0 (use argmax for greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sample: top_k must be an int >= 0 (0 = disabled), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"sample: min_p must be in [0, 1], got {min_p}")


def _sorted_candidates(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates sorted descending: (values with top_k-removed set to -inf, vocab indices)."""
    vocab = scores.shape[1]
    if 0 < top_k < vocab:
        k_ext = min(vocab, top_k + _TIE_MARGIN)
        vals, idx = torch.topk(scores, k_ext, dim=-1, largest=True, sorted=True)
        kth = vals[:, top_k - 1 : top_k]
        # Ties at the k-th value may run past the fetched window: fall back to a full sort (rare;
        # costs one device->host sync to decide).
        if k_ext < vocab and bool((vals[:, -1:] >= kth).any()):
            vals, idx = torch.sort(scores, dim=-1, descending=True)
        return vals.masked_fill(vals < kth, float("-inf")), idx
    return torch.sort(scores, dim=-1, descending=True)


def _candidate_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered, renormalised probabilities over descending-sorted candidates, and their ids."""
    scores = logits.float() / temperature
    vals, idx = _sorted_candidates(scores, top_k)
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        # HF: ascending cumulative sum; drop tokens with cumsum <= 1 - top_p; keep the top one.
        cum_asc = probs.flip(-1).cumsum(-1).flip(-1)
        remove = cum_asc <= 1 - top_p
        remove[:, 0] = False
        probs = probs.masked_fill(remove, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0.0:
        remove = probs < min_p * probs[:, :1]
        remove[:, 0] = False
        probs = probs.masked_fill(remove, 0.0)
    return probs / probs.sum(-1, keepdim=True), idx


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row of ``logits`` [B, V] -> int64 [B] (device-resident).

    HF semantics: temperature -> top_k (0 = off; ties at the k-th value kept) -> top_p (1.0 = off)
    -> min_p (0.0 = off).  ``generator`` must live on the logits' device.
    """
    _check_logits(logits, "sample")
    _check_params(temperature, top_k, top_p, min_p)
    probs, idx = _candidate_probs(logits, temperature, top_k, top_p, min_p)
    choice = draw(probs, generator)  # a non-finite row draws its top candidate, never a device assert
    return idx.gather(1, choice).squeeze(1)


def filtered_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """The distribution :func:`sample` draws from, scattered back to fp32 [B, V] (for tests)."""
    _check_logits(logits, "filtered_probs")
    _check_params(temperature, top_k, top_p, min_p)
    probs, idx = _candidate_probs(logits, temperature, top_k, top_p, min_p)
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return out.scatter_(1, idx, probs)


def sample_ref(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """fp32 reference: HF Temperature/TopK/TopP/MinP warpers in order -> probabilities [B, V]."""
    scores = logits.float() / temperature
    ninf = float("-inf")
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, ninf)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, ninf)
    if min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(remove, ninf)
    return torch.softmax(scores, dim=-1)
