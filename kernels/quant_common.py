# Shared pieces of the quantized matmuls (kernels/qgemv.py, kernels/qgemm.py): input checks and
# the fused load + unpack + dequantize of one weight tile.
#
# Weight layout (the engine's canonical quantized linear weight, engine/quant/spec.py):
#   qweight int32 [N, K * BITS / 32]  codes packed along K, P = 32 / BITS per word, column
#                                     j * P + i in bits [i * BITS, (i + 1) * BITS) of word j
#   scales  fp16 / bf16 / fp32 [N, K / G]  one per group of G input columns of a row
#   zeros   like scales, or None      integer-valued zero points; None: 2**(BITS - 1) (symmetric)
#   mins    like scales, or None      additive group minimums (GGUF's Q4_1 / Q5_1 / K-quants); then
#                                     zeros is None and the zero point is 0
#   w[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G]
#   w[n, k] = code[n, k] * scale[n, k // G] + min[n, k // G]          (with mins; z_ptr holds them)
# Scale modes (constexpr SCALE_MODE, chosen on the host per tile size):
#   0: every tile lies inside one group (BLOCK_K divides G, or a single group): one scale per row
#   1: GROUP_C = G divides BLOCK_K: [BLOCK_N, BLOCK_K / G] scales broadcast over a 3-D view
#   2: anything else: a scale gathered per element (correct for any G, slower)
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cublas import matmul_released

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_S_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def scale_mode(group: int, k: int, block_k: int) -> int:
    """The SCALE_MODE for group size ``group`` over K=``k`` with tiles of ``block_k`` columns."""
    if group == k or group % block_k == 0:
        return 0
    if block_k % group == 0 and group & (group - 1) == 0:
        return 1
    return 2


def check_quant_inputs(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, bias: torch.Tensor | None, mins: torch.Tensor | None = None) -> tuple[int, int, int]:
    """Validate a quantized matmul's operands; returns (N, K, G)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dim() != 2 or qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"x, qweight and scales must be 2-D, got x{tuple(x.shape)} "
                         f"qweight{tuple(qweight.shape)} scales{tuple(scales.shape)}")
    (m, k), n, per = x.shape, qweight.shape[0], 32 // bits
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"unsupported x dtype {x.dtype}; expected bf16, fp16 or fp32")
    if qweight.dtype != torch.int32 or qweight.shape[1] * per != k:
        raise ValueError(f"qweight must be int32 [N, K/{per}] = [{n}, {k // per}] for x{tuple(x.shape)}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dtype not in _S_DTYPES or scales.shape[0] != n or scales.shape[1] < 1 or k % scales.shape[1]:
        raise ValueError(f"scales must be fp16/bf16/fp32 [N={n}, K/G] with K/G dividing K={k}, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != scales.dtype):
        raise ValueError(f"zeros must match scales ({scales.dtype} {tuple(scales.shape)}), "
                         f"got {zeros.dtype} {tuple(zeros.shape)}")
    if mins is not None and (zeros is not None or mins.shape != scales.shape or mins.dtype != scales.dtype):
        raise ValueError(f"mins must match scales ({scales.dtype} {tuple(scales.shape)}) and come without zeros, "
                         f"got {mins.dtype} {tuple(mins.shape)} (zeros {'given' if zeros is not None else 'None'})")
    if m == 0 or k == 0 or n == 0:
        raise ValueError(f"empty operand: x{tuple(x.shape)} qweight{tuple(qweight.shape)}")
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along K (last dim)")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("mins", mins), ("bias", bias)):
        if t is not None and (t.device != x.device or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous and on x's device ({x.device})")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    return n, k, k // scales.shape[1]


def permute_input(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x's columns in packed order (``x[:, perm]``) for act-order weights; x itself without perm."""
    if perm is None:
        return x
    if perm.dtype not in (torch.int32, torch.int64) or perm.shape != (x.shape[1],) or perm.device != x.device:
        raise ValueError(f"perm must be an int32 [{x.shape[1]}] tensor on {x.device}, "
                         f"got {perm.dtype} {tuple(perm.shape)} on {perm.device}")
    return x.index_select(1, perm)


@triton.jit
def _affine(codes, s, z, HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, BITS: tl.constexpr):
    """codes * s + z (HAS_MINS: z are the mins), (codes - z) * s (HAS_ZEROS), else symmetric."""
    if HAS_MINS:
        return codes * s + z
    if HAS_ZEROS:
        return (codes - z) * s
    return (codes - (1 << (BITS - 1))) * s


@triton.jit
def load_dequant(q_ptr, s_ptr, z_ptr, rows, stride_qn, stride_sn, k0, K, group,
                 HAS_ZEROS: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SCALE_MODE: tl.constexpr, GROUP_C: tl.constexpr, EVEN_K: tl.constexpr,
                 HAS_MINS: tl.constexpr = False):
    """The fp32 [BLOCK_N, BLOCK_K] weight tile of rows ``rows`` (in range), columns k0 .. k0+BLOCK_K.

    ``z_ptr`` holds the zero points (HAS_ZEROS) or the additive mins (HAS_MINS), like the scales.
    Columns past K come back as finite values (their x is loaded as 0). The packed words are read
    once, contiguous along each row (evict-first: each is used by one program)."""
    PER: tl.constexpr = 32 // BITS
    offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
    q_ptrs = q_ptr + rows[:, None].to(tl.int64) * stride_qn + offs_w[None, :]
    if EVEN_K:
        words = tl.load(q_ptrs, eviction_policy="evict_first")
    else:
        words = tl.load(q_ptrs, mask=offs_w[None, :] < K // PER, other=0, eviction_policy="evict_first")
    shifts = tl.arange(0, PER) * BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.float32)
    s_row = s_ptr + rows.to(tl.int64) * stride_sn
    z_row = z_ptr + rows.to(tl.int64) * stride_sn
    if SCALE_MODE == 0:
        g = k0 // group
        s = tl.load(s_row + g).to(tl.float32)[:, None]
        z = s
        if HAS_ZEROS + HAS_MINS > 0:
            z = tl.load(z_row + g).to(tl.float32)[:, None]
        w = _affine(codes, s, z, HAS_ZEROS, HAS_MINS, BITS)
    elif SCALE_MODE == 1:
        GPT: tl.constexpr = BLOCK_K // GROUP_C
        offs_g = k0 // GROUP_C + tl.arange(0, GPT)
        g_mask = offs_g[None, :] < K // GROUP_C
        s = tl.load(s_row[:, None] + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        c3 = tl.reshape(codes, (BLOCK_N, GPT, GROUP_C))
        z = s
        if HAS_ZEROS + HAS_MINS > 0:
            z = tl.load(z_row[:, None] + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        w = tl.reshape(_affine(c3, s[:, :, None], z[:, :, None], HAS_ZEROS, HAS_MINS, BITS), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        g = (offs_k // group)[None, :]
        k_mask = offs_k[None, :] < K
        s = tl.load(s_row[:, None] + g, mask=k_mask, other=0.0).to(tl.float32)
        z = s
        if HAS_ZEROS + HAS_MINS > 0:
            z = tl.load(z_row[:, None] + g, mask=k_mask, other=0.0).to(tl.float32)
        w = _affine(codes, s, z, HAS_ZEROS, HAS_MINS, BITS)
    return w


def agrees_with_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int,
                          mins: bool, bias: torch.Tensor | None, out: torch.Tensor, stride: int = 13,
                          tol: float = 2e-2):
    """A tuner's ``accept``: whether ``out`` (just written by a candidate) matches, on every ``stride``-th
    output column, x @ the dequantized weight computed in fp32 torch; a candidate that miscompiles is
    never picked, however fast. ``z`` holds the zero points, or the additive mins when ``mins``."""
    idx = torch.arange(0, q.shape[0], stride, device=q.device)
    zs = z.index_select(0, idx) if z is not None else None
    w = dequant_ref(q.index_select(0, idx), s.index_select(0, idx), None if mins else zs, bits, zs if mins else None)
    ref = matmul_released(x.float(), w.T)  # no cuBLAS workspace kept inside the engine's budget
    if bias is not None:
        ref += bias.index_select(0, idx).float()
    scale = float(ref.norm())

    def accept(_cfg) -> bool:
        got = torch.nan_to_num(out.index_select(1, idx).float(), nan=float("inf"))
        return bool((got - ref).norm() <= tol * scale)

    return accept


def dequant_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference of the [N, K] weight in packed column order."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=qweight.device) * bits
    codes = ((qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(qweight.shape[0], -1).float()
    g = codes.shape[1] // scales.shape[1]
    s = scales.float().repeat_interleave(g, dim=1)
    if mins is not None:
        return codes * s + mins.float().repeat_interleave(g, dim=1)
    z = zeros.float().repeat_interleave(g, dim=1) if zeros is not None else float(1 << (bits - 1))
    return (codes - z) * s
