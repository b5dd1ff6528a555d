"""The MLP of a long stack of token rows in pieces of its intermediate dimension (opt-in; measured slower).

A pass's prompt rows run each layer's projections together (``Model.layer_stacked``): every *unit* of rows costs
every layer its own launches (a norm, each projection's dequantization and GEMM, the SwiGLU), and a served burst
pass is bound by the host issuing them. What bounds a unit's rows is the MLP: its gate_up output (2 x intermediate
a row) and the SwiGLU's (1 x) are 85% of a row's activations.

In pieces, a unit of R rows holds at most R x (3 x piece) of them: for each piece of intermediate columns
``j0:j1``, gate_up's rows ``j0:j1`` and ``I + j0:I + j1`` (one GEMM over both), the SwiGLU of that, and
down_proj's input columns ``j0:j1`` (a K piece) added into an fp32 running sum; the last piece adds the sum into
the output in the compute dtype. The sum costs one K split (fp32, as a split-K GEMM's), not a rounding a piece.

Measured on an H100 (bench/results/2026-12-06-h100-s46/call5, the synthetic 7B AWQ's 16-prompt burst at 6 GiB, arms
alternated round by round in one process so that the host's speed drift falls on each alike): its first pass
(6,647 tokens) as one unit in 6 pieces 273-408 ms against 229-251 ms in units of one 2,048-token chunk; in 4 pieces
it ran out of memory and was retried. Each piece costs every layer 6 launches, which gives back what fewer units
save. Separate processes had suggested otherwise (call2: 218-235 against 341-415 ms), but the host's speed moved
~1.7x within one process (call4). So a served pass takes it only with ``LAYERSTREAM_STACK_PIECES=1``.

Which rows go in pieces: ``ops.mlp_budget`` ``(rows, bytes)``: a stack of at most ``rows`` rows runs whole (the
plan's prompt chunk); above it, ``MOST_PIECES`` pieces, narrower where ``bytes`` requires (:func:`plan_pieces`).
A packed ``down_proj`` with act order (its K in permuted order) or GGUF blocks always run whole.
``LAYERSTREAM_MLP_PIECES=J`` (an A/B): J pieces above ``rows``, whatever the bytes.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from engine.footprint import act_elements_per_token
from engine.quant.spec import QuantWeight
from kernels.qdequant import qdequant
from memory.units import parse_size

ALIGN = 128  # piece boundaries: a multiple of this and of a packed down_proj's group
FP32_SUM = 4  # bytes a row a hidden column: the running sum
ROW_HIDDEN = 3  # hidden-sized tensors a row holds beside its pieces: the new residual, the norm's output, the output
# (the unit's input states wait in parked KV blocks or the plan's VRAM for states). On the H100 (session 46) one
# 6,647-row unit in 4 pieces peaked 141 MiB above units of one chunk (call2; this count says 150), yet ran out of
# memory in call5, as did call4's warm-up pass of 7,488 rows in 6: the count is short of such a pass's worst peak
MOST_PIECES = 6  # a stack holds as many rows as its MLP in this many pieces allows (each piece: 6 launches a layer);
# 6: the 7B's 6,647-token first burst pass fits one unit at 6 GiB (4 pieces ran out of memory: session 46, call5)


def mlp_budget(cfg, rows: int, esize: int, state_bytes: int = 0) -> tuple[int, int]:
    """``ops.mlp_budget`` for prompt chunks of ``rows`` rows: stacks of up to ``rows`` run their MLP whole; longer
    ones in pieces within the activations the plan holds for one chunk (``engine.footprint``'s per-token count) and
    ``state_bytes`` (the plan's VRAM for other prompt states: a pass of one stack has none), or
    ``LAYERSTREAM_MLP_BYTES`` (an A/B)."""
    whole = rows * esize * act_elements_per_token(cfg) + state_bytes
    text = os.environ.get("LAYERSTREAM_MLP_BYTES")
    if text:
        whole = parse_size(text)
    return rows, whole


def unit_rows(budget: tuple[int, int], hidden: int, inter: int, esize: int, most: int = MOST_PIECES) -> int:
    """The rows a stack may hold with its MLP in at most ``most`` pieces within ``budget`` (``plan_pieces``'s
    bytes a row), a multiple of 64, never fewer than the budget's whole rows."""
    width = pieces(inter, -(-inter // most), ALIGN)[0]
    per_row = ROW_HIDDEN * hidden * esize + FP32_SUM * hidden + 3 * esize * (width[1] - width[0])
    return max(budget[0], budget[1] // per_row // 64 * 64)


def one_unit_rows(engine) -> int:
    """The prompt rows a served pass may run as one unit, its MLP in pieces (0: none, a pass's units are chunks):
    with ``LAYERSTREAM_STACK_PIECES=1``, ``unit_rows`` where every layer's MLP may run in pieces (dense or packed
    without act order, not GGUF blocks). A pass with more prompt rows keeps units of one chunk: several long units
    need their other states staged (a second burst pass of two 6,656-row units ran out of memory at 6 GiB).
    Opt-in: measured slower than chunk units (module docstring); at 7,488 rows (the 7B at 6 GiB) the warm-up's
    one-unit pass ran out of memory too (retried in chunk units: bench/results/2026-12-06-h100-s46/call4)."""
    budget, quant = engine.ops.mlp_budget, engine.quant
    if os.environ.get("LAYERSTREAM_STACK_PIECES", "0") != "1":
        return 0
    if budget is None or (quant is not None and (quant.act_order or quant.native)):
        return 0
    cfg = engine.cfg
    return unit_rows(budget, cfg.hidden_size, cfg.intermediate_size, engine.dtype.itemsize)


def chunkable(w_gate_up, w_down) -> bool:
    """Whether this MLP may run in pieces: dense weights, or packed ones without act order (down_proj's K would be
    in permuted order; an act-order checkpoint has it in every projection)."""
    if isinstance(w_gate_up, torch.Tensor) and isinstance(w_down, torch.Tensor):
        return True
    return all(isinstance(w, QuantWeight) and w.perm is None for w in (w_gate_up, w_down))


def align_of(w_down) -> int:
    """Piece boundaries' multiple: ALIGN, and a packed down_proj's group (its K pieces start on one)."""
    if isinstance(w_down, QuantWeight) and w_down.spec.group_size != -1:
        return math.lcm(ALIGN, w_down.group_size)
    return ALIGN


def pieces(inter: int, cols: int, align: int) -> list[tuple[int, int]]:
    """``[0, inter)`` in as many pieces as ``cols`` columns each need, of equal widths rounded up to ``align``
    (so a piece may pass ``cols`` by less than ``align``; the last one ends at ``inter``)."""
    n = -(-inter // max(cols, align))
    step = -(-(-(-inter // n)) // align) * align
    return [(j, min(j + step, inter)) for j in range(0, inter, step)]


def plan_pieces(ops, rows: int, w_gate_up, w_down, hidden: int, inter: int,
                esize: int) -> list[tuple[int, int]] | None:
    """The pieces an MLP of ``rows`` rows runs in (None: whole; see the module docstring). The bytes a row:
    ``ROW_HIDDEN x hidden`` in the compute dtype, the fp32 sum, and ``3 x piece`` of gate_up and SwiGLU output."""
    budget = getattr(ops, "mlp_budget", None)
    if budget is None or rows <= budget[0] or not chunkable(w_gate_up, w_down):
        return None
    align = align_of(w_down)
    forced = os.environ.get("LAYERSTREAM_MLP_PIECES") or getattr(ops, "mlp_pieces", None)  # an A/B, or the caller's
    if forced:
        cols = -(-inter // max(1, int(forced)))
    else:  # MOST_PIECES pieces where the bytes allow (one set of GEMM shapes: the warm-up tunes them), else more
        room = (budget[1] // rows - ROW_HIDDEN * hidden * esize - FP32_SUM * hidden) // (3 * esize)
        cols = min(-(-inter // MOST_PIECES), room)
    tile = getattr(ops, "_scratch", 0)
    if isinstance(w_gate_up, QuantWeight) and tile:  # gate_up's two row ranges widened into the dense tile
        cols = min(cols, tile // (2 * hidden * esize) // align * align)
    if cols >= inter:
        return None
    return pieces(inter, max(cols, align), align)


def run(ops, x: torch.Tensor, w_gate_up, w_down, parts: list[tuple[int, int]], inter: int) -> torch.Tensor:
    """``down(swiglu(gate_up(x)))`` for x [R, hidden] in the pieces ``parts`` of the intermediate columns."""
    triton = ops.name == "triton"
    total = torch.empty((x.shape[0], w_down.shape[0]), dtype=torch.float32, device=x.device)
    out = total
    for n, (j0, j1) in enumerate(parts):
        gate_up = (_triton_gate_up if triton else _torch_gate_up)(ops, x, w_gate_up, j0, j1, inter)
        act = ops.swiglu(gate_up)
        del gate_up
        if n == len(parts) - 1:
            out = torch.empty((x.shape[0], w_down.shape[0]), dtype=x.dtype, device=x.device)
        (_triton_down if triton else _torch_down)(ops, act, w_down, j0, j1, out, None if n == 0 else total)
        del act
    return out


def _rows(w, j0: int, j1: int, inter: int):
    """gate_up's rows of the piece: gate ``j0:j1`` and up ``inter + j0:inter + j1``."""
    if isinstance(w, QuantWeight):
        return w.row_slice(j0, j1), w.row_slice(inter + j0, inter + j1)
    return w[j0:j1], w[inter + j0:inter + j1]


def _cols(w, j0: int, j1: int):
    """down_proj's input columns ``j0:j1`` (views)."""
    return w.col_slice(j0, j1) if isinstance(w, QuantWeight) else w[:, j0:j1]


def _torch_gate_up(ops, x, w, j0, j1, inter):
    gate, up = _rows(w, j0, j1, inter)
    return torch.cat([ops.linear(x, gate), ops.linear(x, up)], dim=-1)


def _torch_down(ops, act, w, j0, j1, out, acc) -> None:
    part = ops.linear(act, _cols(w, j0, j1)).float()
    out.copy_(part if acc is None else part + acc)


def _triton_gate_up(ops, x, w, j0, j1, inter):
    """One GEMM over both row ranges (a packed weight: widened into the dense tile), or two into the halves."""
    gate, up = _rows(w, j0, j1, inter)
    s = j1 - j0
    if isinstance(w, QuantWeight):  # no act order (chunkable)
        dense = _dense(ops, x, 2 * s, x.shape[1])
        for half, part in ((dense[:s], gate), (dense[s:], up)):
            qdequant(part.qweight, part.scales, part.zeros, part.spec.bits, x.dtype, mins=part.mins, out=half)
        return ops._k["linear"](x, dense)
    out = torch.empty((x.shape[0], 2 * s), dtype=x.dtype, device=x.device)
    ops._k["linear"](x, gate, out=out[:, :s])
    ops._k["linear"](x, up, out=out[:, s:])
    return out


def _triton_down(ops, act, w, j0, j1, out, acc) -> None:
    piece = _cols(w, j0, j1)
    if isinstance(w, QuantWeight):
        dense = _dense(ops, act, w.shape[0], j1 - j0)
        piece = qdequant(piece.qweight, piece.scales, piece.zeros, piece.spec.bits, act.dtype, mins=piece.mins,
                         out=dense)
    ops._k["linear"](act, piece, out=out, acc=acc)


def _dense(ops, x: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """A dense ``[rows, k]`` weight piece in the plan's tile (a fresh tensor where x's rows take no tile)."""
    buf = ops._tile_buffer(x)
    if buf is None:
        return torch.empty((rows, k), dtype=x.dtype, device=x.device)
    return ops._tile_view(buf, rows, k, x.dtype)


def reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """fp32 torch reference of the whole MLP (dense weights) for tests: ``down(silu(gate) * up)``."""
    g, u = F.linear(x.float(), gate_up.float()).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down.float())
