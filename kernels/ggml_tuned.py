"""Launch configs of :func:`kernels.ggml_gemv.ggml_gemv` measured on the H200 (sm_90).

``bench/probe_qkernels.py --ggml-sweep`` timed every candidate (BLOCK_N, num_warps, SPLIT_K) against the
fixed guesses of ``launch_meta`` for Q4_K, Q6_K, Q5_0 and Q8_0 blocks at the Qwen2.5-7B projection shapes,
M = 1, 4 and 16 rows, bf16 x, each checked against the fp32 reference first
(``bench/results/2026-12-01-h200-s9/call2/sweep_ggml.*``). A shape is classed by its N and K (``kv``: N <= 1024,
``wide``: N >= 2K, ``deep``: K >= 2N, else ``square``); types not swept take the nearest swept one's
pick (Q5_K: Q6_K's; Q4_0 / Q4_1 / Q5_1: Q5_0's); M classes 1, 2..4 and 5..16 (Q5_0 / Q8_0 were not swept
at 16 rows: their 4-row picks). More rows, other GPUs, fp32 x, or no entry: ``launch_meta``'s fixed guesses.
"""

from __future__ import annotations

import functools

import torch

# (swept type, M class, shape class) -> (BLOCK_N, num_warps, SPLIT_K); comments: fixed -> picked, us
SM90: dict[tuple[str, int, str], tuple[int, int, int]] = {
    ("q4_k", 1, "square"): (16, 2, 4),  # 19.8 -> 11.9 us
    ("q4_k", 1, "kv"): (8, 2, 4),  # 18.1 -> 8.5 us
    ("q4_k", 1, "wide"): (16, 2, 1),  # 54.4 -> 32.4 us
    ("q4_k", 1, "deep"): (32, 2, 8),  # 99.6 -> 36.0 us
    ("q6_k", 1, "square"): (16, 4, 4),  # 28.5 -> 22.5 us
    ("q6_k", 1, "kv"): (16, 4, 4),  # 24.4 -> 12.0 us
    ("q6_k", 1, "wide"): (32, 4, 1),  # 101.9 -> 91.6 us
    ("q6_k", 1, "deep"): (16, 4, 4),  # 139.2 -> 92.5 us
    ("q5_0", 1, "square"): (8, 2, 2),  # 34.3 -> 21.4 us
    ("q5_0", 1, "kv"): (8, 2, 4),  # 28.7 -> 10.4 us
    ("q5_0", 1, "wide"): (8, 2, 1),  # 157.7 -> 75.1 us
    ("q5_0", 1, "deep"): (8, 2, 2),  # 180.1 -> 96.5 us
    ("q8_0", 1, "square"): (16, 4, 4),  # 18.2 -> 14.1 us
    ("q8_0", 1, "kv"): (8, 8, 4),  # 16.0 -> 8.1 us
    ("q8_0", 1, "wide"): (16, 2, 1),  # 51.2 -> 43.7 us
    ("q8_0", 1, "deep"): (32, 4, 8),  # 87.7 -> 48.4 us
    ("q4_k", 4, "square"): (64, 4, 4),  # 48.6 -> 20.6 us
    ("q4_k", 4, "kv"): (16, 4, 4),  # 32.8 -> 13.0 us
    ("q4_k", 4, "wide"): (64, 2, 2),  # 200.7 -> 72.7 us
    ("q4_k", 4, "deep"): (64, 2, 8),  # 242.7 -> 58.4 us
    ("q6_k", 4, "square"): (32, 4, 4),  # 149.1 -> 26.0 us
    ("q6_k", 4, "kv"): (32, 4, 4),  # 78.0 -> 19.9 us
    ("q6_k", 4, "wide"): (64, 4, 1),  # 650.7 -> 96.2 us
    ("q6_k", 4, "deep"): (32, 4, 4),  # 804.0 -> 104.5 us
    ("q5_0", 4, "square"): (64, 4, 4),  # 69.1 -> 44.2 us
    ("q5_0", 4, "kv"): (8, 2, 4),  # 48.1 -> 15.5 us
    ("q5_0", 4, "wide"): (16, 2, 1),  # 305.2 -> 197.2 us
    ("q5_0", 4, "deep"): (32, 4, 8),  # 358.8 -> 200.3 us
    ("q8_0", 4, "square"): (64, 8, 4),  # 54.5 -> 22.0 us
    ("q8_0", 4, "kv"): (8, 2, 4),  # 45.3 -> 14.5 us
    ("q8_0", 4, "wide"): (32, 4, 1),  # 243.0 -> 78.9 us
    ("q8_0", 4, "deep"): (64, 2, 8),  # 267.7 -> 82.8 us
    ("q4_k", 16, "square"): (64, 4, 4),  # 74.9 -> 26.2 us
    ("q4_k", 16, "kv"): (16, 4, 4),  # 44.7 -> 16.4 us
    ("q4_k", 16, "wide"): (64, 2, 1),  # 310.3 -> 103.8 us
    ("q4_k", 16, "deep"): (64, 2, 8),  # 376.7 -> 90.4 us
    ("q6_k", 16, "square"): (64, 8, 4),  # 163.0 -> 30.9 us
    ("q6_k", 16, "kv"): (32, 4, 4),  # 86.9 -> 23.3 us
    ("q6_k", 16, "wide"): (64, 4, 1),  # 711.8 -> 123.6 us
    ("q6_k", 16, "deep"): (64, 2, 8),  # 911.4 -> 124.5 us
}
NEAREST = {"q4_k": "q4_k", "q5_k": "q6_k", "q6_k": "q6_k", "q8_0": "q8_0", "q4_0": "q5_0", "q4_1": "q5_0",
           "q5_0": "q5_0", "q5_1": "q5_0"}


def shape_class(n: int, k: int) -> str:
    """``kv`` (few outputs), ``wide`` (N >= 2K), ``deep`` (K >= 2N) or ``square``."""
    if n <= 1024:
        return "kv"
    return "wide" if n >= 2 * k else "deep" if k >= 2 * n else "square"


@functools.cache
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def pick(qtype: str, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> dict[str, int] | None:
    """The measured config for this call (a ``ggml_gemv`` ``config``), or None for the fixed guesses."""
    # more than 16 rows were not swept: a tile of more rows may not fit the registers a 16-row pick had
    if dtype == torch.float32 or m > 16 or not _sm90(device):
        return None
    swept, shape = NEAREST.get(qtype), shape_class(n, k)
    mc = 1 if m == 1 else 4 if m <= 4 else 16
    hit = SM90.get((swept, mc, shape)) or SM90.get((swept, 4, shape))
    if hit is None:
        return None
    block_n, warps, split = hit
    return {"BLOCK_N": block_n, "num_warps": warps, "SPLIT_K": split}
