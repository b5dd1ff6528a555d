"""The canonical quantized linear weight: what the loaders produce and the kernels read.

A quantized ``nn.Linear`` weight of logical shape ``[N, K]`` (``[out_features, in_features]``,
Hugging Face layout) is held as:

``qweight``  int32 ``[N, K * bits / 32]``, row-major contiguous. Packed along the input dim K:
             word ``j`` of row ``n`` holds the unsigned codes of columns ``k = j * P .. j * P + P - 1``
             (``P = 32 / bits``: 8 for int4, 4 for int8), column ``j * P + i`` in bits
             ``[i * bits, (i + 1) * bits)`` (little end first). Codes are unsigned, ``0 .. 2**bits - 1``.
             This is GPTQ's and compressed-tensors' order along K (row n's words are contiguous, so
             a GEMV reads each weight row as one coalesced run of ``K * bits / 8`` bytes and unpacks
             the codes in registers with shifts).
``scales``   fp16 or bf16 ``[N, K / G]``, contiguous: the scale of group ``k // G`` of row n.
``zeros``    asymmetric: same dtype and shape as ``scales``, integer-valued zero points (0 .. 2**bits,
             exact in fp16 and bf16; GPTQ v1's "stored minus one" can give 2**bits);
             symmetric: ``None`` and the zero point is ``2**(bits - 1)`` (8 for int4, 128 for int8).
``mins``     ``None``, or (llama.cpp's "scale and min" form: GGUF Q4_1 / Q5_1 / K-quants) the additive
             minimum of each group, same dtype and shape as ``scales``; then ``zeros`` is ``None``
             and the zero point is 0 (``spec.mins``).
``perm``     ``None``, or int32 ``[K]``: the input columns in packed order (GPTQ ``desc_act``). The
             packed column j holds input channel ``perm[j]``, so ``y = x[:, perm] @ W_packed.T``.

The weight is ``w[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G]``, or with ``mins``
``w[n, k] = code[n, k] * scale[n, k // G] + min[n, k // G]`` (one fp32 product and one fp32 sum, as
ggml's own dequantizers; the product of a code and a scale is exact in fp32 for every GGUF type).
Scales are fp16 / bf16, or fp32 where a format's effective scale is a product that fp16 cannot
hold exactly (the K-quants' super-block scale times a 6-bit sub-block scale). ``G`` is the group
size (32, 64, 128, ...; it must divide K) or K itself for per-channel scales (``group_size == -1``,
as in the Hugging Face configs). K must be a multiple of ``32 / bits``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

BITS = (4, 8)
HALF_SCALES = (torch.float16, torch.bfloat16)  # what rounding to nearest stores (engine.quant.rtn)
SCALE_DTYPES = (*HALF_SCALES, torch.float32)  # fp32: GGUF K-quant scales, exact only in fp32


@dataclass(frozen=True)
class QuantSpec:
    """How a linear weight is quantized: ``bits`` (4 or 8), ``group_size`` (-1: per channel),
    ``sym`` (no stored zero points), ``fmt``, the source format (``awq``, ``gptq``,
    ``compressed-tensors``, ``rtn``, ``gguf``) named in plan lines, and ``mins`` (additive group
    minimums instead of zero points: ``w = code * scale + min``; requires ``sym``)."""

    bits: int
    group_size: int
    sym: bool
    fmt: str
    mins: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"unsupported bit width {self.bits}; supported: 4, 8")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size}")
        if self.mins and not self.sym:
            raise ValueError("a spec with additive mins has no zero points: it must be sym")

    @property
    def pack(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    def group(self, k: int) -> int:
        """The group size G for an input dim of ``k`` (``k`` itself per channel)."""
        return k if self.group_size == -1 else self.group_size

    @property
    def label(self) -> str:
        """Short description for plan lines, e.g. ``awq int4 g128``."""
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        form = " +min" if self.mins else " sym" if self.sym else ""
        return f"{self.fmt} int{self.bits} {group}{form}"


@dataclass(frozen=True)
class QuantWeight:
    """One quantized linear weight in the canonical layout (module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    spec: QuantSpec
    in_features: int
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Logical weight shape ``(N, K)``."""
        return (self.qweight.shape[0], self.in_features)

    @property
    def group_size(self) -> int:
        """The effective group size G (K when per channel)."""
        return self.spec.group(self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by canonical name (what is counted, streamed and read)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.mins is not None:
            out["mins"] = self.mins
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    @property
    def nbytes(self) -> int:
        """Bytes stored (packed codes, scales, zeros, perm)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantWeight:
        """A copy with every tensor on ``device``."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantWeight(moved["qweight"], moved["scales"], moved.get("zeros"), moved.get("perm"),
                           self.spec, self.in_features, moved.get("mins"))

    def row_slice(self, start: int, stop: int) -> QuantWeight:
        """Output rows ``start:stop`` as a weight of their own (views of this one's tensors)."""
        sl = slice(start, stop)
        return QuantWeight(self.qweight[sl], self.scales[sl], None if self.zeros is None else self.zeros[sl],
                           self.perm, self.spec, self.in_features, None if self.mins is None else self.mins[sl])

    def col_slice(self, start: int, stop: int) -> QuantWeight:
        """Input columns ``start:stop`` as a weight of their own (views: row strides of this one's tensors): a
        weight without act order, ``start`` and ``stop`` on group boundaries (``stop`` may be K; per channel: any
        packed word)."""
        per, k = 32 // self.spec.bits, self.in_features
        g = k if self.spec.group_size == -1 else self.group_size
        assert self.perm is None and 0 <= start < stop <= k and start % per == 0, (start, stop, per)
        q = slice(start // per, -(-stop // per))
        if self.spec.group_size == -1:  # one scale a row: the slice keeps it
            gs = slice(None)
        else:
            assert start % g == 0 and (stop % g == 0 or stop == k), (start, stop, g)
            gs = slice(start // g, -(-stop // g))
        return QuantWeight(self.qweight[:, q], self.scales[:, gs], None if self.zeros is None else self.zeros[:, gs],
                           None, self.spec, stop - start, None if self.mins is None else self.mins[:, gs])

    def check(self, name: str = "weight") -> None:
        """Raise ValueError (naming ``name``) unless every tensor has the canonical shape and dtype."""
        check_canonical(name, self.qweight, self.scales, self.zeros, self.perm, self.spec, self.in_features,
                        self.mins)


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected {want} {list(shape)}, got {str(t.dtype).removeprefix('torch.')} "
                         f"{list(t.shape)}")


def check_canonical(name: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    perm: torch.Tensor | None, spec: QuantSpec, k: int, mins: torch.Tensor | None = None) -> None:
    """Validate one canonical weight's tensors; ValueError names the tensor and what was expected."""
    g = spec.group(k)
    if k % spec.pack:
        raise ValueError(f"{name}: in_features {k} is not a multiple of {spec.pack} ({spec.bits}-bit packing)")
    if k % g:
        raise ValueError(f"{name}: group size {g} does not divide in_features {k}")
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    _expect(f"{name}.qweight", qweight, (n, k // spec.pack), (torch.int32,))
    _expect(f"{name}.scales", scales, (n, k // g), SCALE_DTYPES)
    if spec.sym != (zeros is None):
        raise ValueError(f"{name}: {'symmetric' if spec.sym else 'asymmetric'} spec but zeros "
                         f"{'given' if zeros is not None else 'missing'}")
    if zeros is not None:
        _expect(f"{name}.zeros", zeros, (n, k // g), (scales.dtype,))
    if spec.mins != (mins is not None):
        raise ValueError(f"{name}: mins {'missing' if spec.mins else 'given'} for a spec "
                         f"{'with' if spec.mins else 'without'} additive mins")
    if mins is not None:
        _expect(f"{name}.mins", mins, (n, k // g), (scales.dtype,))
    if perm is not None:
        _expect(f"{name}.perm", perm, (k,), (torch.int32,))


# The packing works on the words' bytes (uint8 views): column j * P + i of a little-endian int32 word
# is byte i (int8) or the low / high nibble of byte i // 2 (int4). Host tensors are little-endian
# on every platform torch runs the engine on (x86-64, aarch64); GPUs are little-endian too.
assert sys.byteorder == "little", "the int32 packing helpers assume a little-endian host"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[R, C]`` (any int dtype, values < 2**bits) along C into int32
    ``[R, C * bits / 32]`` in the canonical order (column ``j * P + i`` in bits ``i * bits``)."""
    rows, cols = codes.shape
    assert cols % (32 // bits) == 0, f"{cols} columns do not pack into {bits}-bit words"
    c = codes.to(torch.uint8)
    if bits == 4:
        pairs = c.reshape(rows, cols // 2, 2)
        c = pairs[..., 0] | (pairs[..., 1] << 4)
    return c.contiguous().view(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[R, W]`` -> unsigned uint8 codes ``[R, W * 32 / bits]``."""
    b = words.contiguous().view(torch.uint8)
    if bits == 8:
        return b
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(words.shape[0], -1)


def dequantize(w: QuantWeight) -> torch.Tensor:
    """fp32 reference: the full-precision ``[N, K]`` weight in the input channels' own order. The codes are
    written straight into the float result and scaled there group by group (the module docstring's one
    product and one sum or difference per weight, so the values of any other order of the same operations)."""
    n, k = w.shape
    b = w.qweight.contiguous().view(torch.uint8)
    y = torch.empty(n, k, dtype=torch.float32, device=b.device)
    if w.spec.bits == 8:
        y.copy_(b)
    else:  # column 2i in the low nibble of byte i, 2i + 1 in the high one (unpack_codes' order)
        pairs = y.view(n, k // 2, 2)
        pairs[..., 0], pairs[..., 1] = b & 15, b >> 4
    groups = y.view(n, k // w.group_size, w.group_size)
    scales = w.scales.float().unsqueeze(-1)
    if w.mins is not None:
        groups.mul_(scales).add_(w.mins.float().unsqueeze(-1))
    else:
        groups.sub_(w.zeros.float().unsqueeze(-1) if w.zeros is not None else float(1 << (w.spec.bits - 1)))
        groups.mul_(scales)
    # packed column j holds input channel perm[j]: channel c is packed column argsort(perm)[c]
    return y if w.perm is None else y.index_select(1, torch.argsort(w.perm.long()))
