"""How many key splits the split-KV decode attention (kernels.attention_decode) runs: host-side arithmetic on
the SM count, the batch's programs and the bound on the lengths, shared by the launcher and its tuner."""

from __future__ import annotations

import functools
import os

import torch
import triton

MIN_CHUNK = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 32  # bounds the split count by max_seq_len
MAX_SPLITS = 256


@functools.cache
def gpu_info(index: int) -> tuple[int, bool]:
    """(SM count, programmatic dependent launch: sm90+ unless KERNELS_PDL=0) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major >= 9 and os.environ.get("KERNELS_PDL", "1") != "0"


def split_cap(max_len: int) -> int:
    """The most splits a bound of ``max_len`` keys takes: none shorter than MIN_CHUNK, at most MAX_SPLITS."""
    return min(MAX_SPLITS, triton.cdiv(max(max_len, 1), MIN_CHUNK))


@functools.lru_cache(maxsize=1024)
def split_plan(sms: int, B: int, Hk: int, max_len: int) -> int:
    """Default split count: >= 2 programs per SM, at most :func:`split_cap`."""
    return max(1, min(triton.cdiv(2 * sms, max(B * Hk, 1)), split_cap(max_len)))


def split_candidates(sms: int, B: int, Hk: int, max_len: int) -> list[int]:
    """Split counts the first-call tuning times: 1/4 (for the one-kernel merge), 1/2, 1, 2 x default."""
    s = split_plan(sms, B, Hk, max_len)
    return sorted({max(1, s // 4), max(1, s // 2), s, max(s, min(2 * s, split_cap(max_len)))})
