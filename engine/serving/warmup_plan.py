"""The warm-up's steps (``engine.serving.warmup`` runs them): which prompt slices, mixed and decode steps, real or
compile-only, meet every kernel shape and specialisation a server's passes will (see that module's docstring)."""

from __future__ import annotations

from dataclasses import dataclass

GEMV_MAX_M = 64  # kernels.linear.GEMV_MAX_M: more rows go to the tuned GEMM, keyed by next_power_of_2(rows)
REAL_CONTEXT = 16  # decoding rows' context in real passes (their tuning does not depend on it)


@dataclass(frozen=True)
class WarmStep:
    """One warm-up step: ``decoding`` sequences decode in the top slots of rows ``0 .. decode_rows``
    (the decode group's rows), each with ``context`` tokens after the step; each entry of ``slices``
    is a prompt of that many tokens prefilled whole in a free slot (after ``cached`` tokens already in the
    cache: a long prompt's later slice). ``dry``: a compile-only pass."""

    dry: bool
    decode_rows: int
    decoding: int
    context: int
    slices: tuple[int, ...] = ()
    cached: int = 0  # each slice's prompt has this many tokens in the cache before it (a later slice)

    @property
    def kind(self) -> str:
        return "decode" if not self.slices else "mixed" if self.decode_rows else "prefill"


def _pow2(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` up to next_power_of_2(hi)."""
    out, b = [], lo
    while b // 2 < hi:
        out.append(b)
        b *= 2
    return out


def _even_odd(eff: int) -> set[int]:
    """Each row bucket's even and odd sizes up to ``eff`` (a power of two b and b - 1: Triton compiles a row count
    that is a multiple of 16 apart from one that is not)."""
    return {n for b in _pow2(4, eff) for n in (b - 1, b)}


def _pack(sizes: list[int], cap: int, most: int) -> list[tuple[int, ...]]:
    """First-fit decreasing: groups of at most ``most`` sizes summing to at most ``cap``."""
    bins: list[list[int]] = []
    for n in sorted(sizes, reverse=True):
        fit = next((b for b in bins if sum(b) + n <= cap and len(b) < most), None)
        if fit is None:
            bins.append([n])
        else:
            fit.append(n)
    return [tuple(b) for b in bins]


def _contexts(max_context: int, block_size: int | None) -> list[int]:
    """Decode contexts whose attention kernels differ, up to the longest a decoding sequence reaches
    (max_context - 1). Slot cache: one per split bound (powers of two from 256). Paged: the split cap is
    the block table's width, so widths of a power of two blocks, and from 16 blocks on (where the split
    count's divisibility by 16 specialises the kernel) one block fewer too."""
    last = max(1, max_context - 1)
    if block_size is None:
        return [c for c in _pow2(256, last) if c < last] + [last]
    widths = {w for b in _pow2(1, -(-last // block_size)) for w in ((b, b - 1) if b >= 16 else (b,))}
    return sorted({min(w * block_size, last) for w in widths})


def plan_warmup(batch: int, chunk: int, max_context: int, eager_decode: bool, dry: bool,
                block_size: int | None = None, splits: tuple[int, ...] = ()) -> list[WarmStep]:
    """The warm-up steps for ``batch`` slots and a ``chunk``-token prefill chunk: real passes first, then
    (``dry``) compile-only ones. ``eager_decode``: pure decode steps run eagerly (paged KV, no decode
    graph) and get compile-only passes too; ``block_size``: paged KV's (None: the slot cache), which
    decides the decode contexts whose kernels differ (:func:`_contexts`). ``splits``: row counts where the
    linears change kernel inside a GEMM bucket; each gets a real slice too (a quantized model's fused
    qgemm takes rows up to ``DENSE_MIN_M - 1``, inside the dense GEMM's 256-row bucket: without its own
    slice its 129..255-row bucket tuned in the first live pass that met it: 10 builds, 11.2 s, on the H200)."""
    eff = max(1, min(chunk, max_context))
    ctx = max(1, min(REAL_CONTEXT, max_context - 1))
    # the first pack is the chunk alone: its one picked row also tunes the lm_head GEMV's single-row bucket
    real = sorted({min(b, eff) for b in _pow2(2 * GEMV_MAX_M, eff)} | {n for n in splits if 2 * GEMV_MAX_M < n < eff},
                  reverse=True)
    packs = _pack(real, eff, batch) or ([(eff,)] if eff >= 2 else [])
    steps = [WarmStep(False, 0, 0, 0, p) for p in packs]
    for m in (16, 32, 64):  # lm_head rows of a mixed step = decoding rows + slices: each GEMV bucket once
        p = min(m, batch)
        if p >= (2 if m == 16 else m // 2 + 1) and eff - (p - 1) >= 2:
            steps.append(WarmStep(False, p - 1, p - 1, ctx, (min(eff - (p - 1), 2 * GEMV_MAX_M),)))
    if not dry:
        return steps
    sizes = _even_odd(eff) | {2, eff}
    steps += [WarmStep(True, 0, 0, 0, p) for p in _pack([n for n in sizes if 2 <= n <= eff], eff, batch)]
    # a prompt longer than the chunk: a later slice after a chunk of cached positions, even and odd (the
    # H200's first 1857-token request after a warm-up without them compiled two GEMM specialisations)
    steps += [WarmStep(True, 0, 0, 0, (n,), cached=eff) for n in sorted({eff // 2, eff // 2 + 1, eff - 1})
              if n >= 2 and eff + n < max_context]
    contexts = _contexts(max_context, block_size)
    for c in contexts:
        for r in range(1, batch + 1):
            decoding = r if r < batch else r - 1  # a slot is left for the slice
            if batch >= 2 and decoding >= 1 and eff - decoding >= 2:
                steps.append(WarmStep(True, r, decoding, c, (2,)))
    if eager_decode:  # its layers run the mixed steps' decode group: only its head's rows are new
        steps += [WarmStep(True, r, r, contexts[0]) for r in range(1, batch + 1)]
    return steps


def varlen_steps(batch: int, chunk: int, max_context: int) -> list[WarmStep]:
    """Compile-only steps of two prompt slices sharing a stack, for engine/varlen.py's one-launch kernels
    (on unless ``LAYERSTREAM_VARLEN_PREFILL=0``): the longer slice (the attention's row count) at each bucket's
    even and odd sizes, and one stack of a multiple of 16 rows (the RoPE + append's), so a served burst builds
    none."""
    eff = max(1, min(chunk, max_context))
    if batch < 2:
        return []
    steps = [WarmStep(True, 0, 0, 0, (n, 2)) for n in sorted(_even_odd(eff) | {2}) if n + 2 <= eff]
    return steps + ([WarmStep(True, 0, 0, 0, (16, 16))] if eff >= 32 else [])


def piece_steps(batch: int, chunk: int, max_context: int, rows: int) -> list[WarmStep]:
    """Where a served pass of at most ``rows`` prompt rows runs as one unit (``ModelRunner.one_unit``): a real
    pass of that many rows in chunk-sized slices (its MLP in pieces, whose GEMM shapes are one set a model,
    ``engine.mlp_chunks.MOST_PIECES``, and whose rows fall in the GEMMs' top row bucket: tuned), then a compile-only
    one of an odd row count (the kernels' other specialisation of the rows)."""
    eff = max(1, min(chunk, max_context - 1))
    steps = []
    for total, dry in ((rows, False), (rows - 1, True)):
        if total <= eff or batch < 2:
            return []
        slices = [eff] * min(batch, total // eff)
        rest = total - sum(slices)
        if len(slices) < batch and rest >= 2:
            slices.append(rest)
        if sum(slices) > eff:
            steps.append(WarmStep(dry, 0, 0, 0, tuple(slices)))
    return steps
