"""Compile ahead of a process's first decode step and of each new prompt shape's first prefill.

kernels/ahead.py compiles the Triton kernels a pass would launch, in parallel, without launching them.
Here the engine runs such dry passes: the model's forward with the streamed weights replaced by the
bytes already in staging slot 0 (``ModelWeights.dry``: nothing is copied or waited for), so the pass
costs its Python and the compiles. The real pass that follows then finds every kernel compiled: on a
fresh machine the serial first-launch compiles are what made a first run slow (issue 14). A host lane
(engine.host_lane) sits out the dry passes: its layers are dry-streamed like the others (the same shapes,
so the same kernels), its CPU work and KV cache untouched. (Until session 40 a run with host layers
skipped compile ahead; with ``--host-compute auto`` the default, a first run on an H100 took 36.2 s against
11.4 s cached, its decode graphs' warm-up 16.1 s and its first prefill 10.3 s compiling and tuning.) Used on
CUDA with the Triton kernels, where tuning picks
exist (the user's cache or those shipped for the GPU: a dry pass compiles the picks; without any,
the real pass tunes and compiles its candidates in parallel itself); off with
``LAYERSTREAM_COMPILE_AHEAD=0``, in threads rather than worker processes with ``=threads``.

The worker processes (kernels/ahead_pool.py) take a few seconds each to import torch and triton, so
:func:`prestart` starts them before the weights load when this run's dry passes will use them and
Triton's on-disk cache looks cold (a fresh machine); otherwise they start at the first kernel the
on-disk cache lacks, and a warm run starts none.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from kernels.ahead import mode
from kernels.ahead_pool import start_pool
from kernels.ahead_procs import cache_looks_cold, warm_key_in_background

log = logging.getLogger(__name__)


def _enabled(device: torch.device, kernels: str) -> bool:
    if not (device.type == "cuda" and kernels == "triton" and mode() != "off"):
        return False
    from kernels.tuning_cache import has_entries

    return has_entries(device)  # else the real pass tunes: its candidates compile in parallel there


def wanted(model) -> bool:
    """Whether dry passes can save compiles for ``model`` (an engine.model.Model)."""
    return _enabled(model.device, model.ops.name)


def prestart(device: torch.device, kernels: str) -> bool:
    """Start the compile-ahead worker processes now (they import while the weights load) when the dry
    passes of a model on ``device`` with these ``kernels`` will send them compiles and Triton's on-disk
    cache looks cold; returns whether it started them."""
    if mode() != "processes" or not _enabled(device, kernels) or not cache_looks_cold():
        return False
    warm_key_in_background()
    return start_pool() is not None


@contextlib.contextmanager
def dry(model) -> Iterator[None]:
    """Inside: the model's passes are dry (streamed weights are staging slot 0's bytes, uncopied) and this
    thread's Triton launches only compile (``kernels.ahead.compile_only``); on exit every compile is done.
    A host lane is detached meanwhile: its layers run dry on the device like the streamed ones."""
    from kernels.ahead import compile_only

    model.weights.dry, host, model.host = True, model.host, None
    try:
        with compile_only():
            yield
    finally:
        model.weights.dry, model.host = False, host
        torch.cuda.synchronize(model.device)  # the dry pass's torch work, before real work reuses its memory


def prefill_key(prefill_chunk: int, lens: list[int]) -> tuple[int, ...]:
    """A prefill's shape as compile ahead keys it: ``(chunk per row, *prompt lengths)``; the chunk per row is
    what ``Model.prefill`` gets for these prompts (``engine.generate.prefill``)."""
    return (max(1, prefill_chunk // len(lens)), *lens)


def decode(model, cache, batch: int, first_prompts: tuple[int, ...] = (), prefill_chunk: int = 0,
           chunk_context=None) -> tuple[int, ...] | None:
    """Compile the kernels of a decode step of ``batch`` rows at the cache's full length (what the
    decode graph's warm-up runs next) and of its greedy sampling; with ``first_prompts`` (prompt lengths)
    also those of their prefill (``engine.generate.prefill``'s call), in the same pool, so the two sets
    compile side by side. Returns that prefill's shape key ``(chunk, *lengths)``, or None."""
    if not wanted(model):
        return None
    dev = model.device
    ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
    start = torch.zeros(batch, dtype=torch.int32, device=dev)
    with dry(model):
        logits = model.forward(ids, start, torch.ones(batch, dtype=torch.int32, device=dev), cache, cache.max_context)
        from kernels.sampling import argmax  # greedy's kernels too (0.6 s at the first token of a first run)

        argmax(logits[:, :model.cfg.vocab_size])
        if not first_prompts:
            return None
        key = prefill_key(prefill_chunk, list(first_prompts))
        lens = list(key[1:])
        model.prefill(torch.zeros((len(lens), max(lens)), dtype=torch.long, device=dev), lens, key[0], cache,
                      chunk_context)
    return key


def prefill(model, ids: torch.Tensor, lens: list[int], chunk: int, cache, chunk_context) -> None:
    """Compile the kernels of ``model.prefill`` over these prompts (the call that follows)."""
    if not wanted(model):
        return
    with dry(model):
        model.prefill(ids, lens, chunk, cache, chunk_context)
