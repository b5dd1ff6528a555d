"""A served pass that runs out of device memory runs once more before the error reaches the server.

Session 30: with ``--prefill-chunk 3072`` at 6 GiB on the H200, a served pass failed asking 220 MiB with 4.65 GiB
allocated of the 5.15 GiB allowed and 297 MiB reserved but not in one piece (the allocator's own release and retry
had not found it). The server then failed every running request."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.serving.runner import ModelRunner
    from engine.serving.sequence import Sequence

log = logging.getLogger(__name__)


def grouped_retried(runner: ModelRunner, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
    """``runner._grouped(seqs)``; when it runs out of device memory, again once with the cached memory released
    and half as many rows a stack (the peak of a prompt pass is one stack's MLP) and no memory lent to the streamer,
    before the error reaches the
    caller (the server fails the running requests). A pass changes nothing a retry would see twice: the
    sequences' computed tokens advance after it returns, it rewrites its keys and values, and a paged cache's
    binding and last gathered copy are dropped."""
    deferred = [s.deferred for s in seqs]
    try:
        return runner._grouped(seqs)
    except torch.OutOfMemoryError as e:  # leaving the handler frees the failed pass's frames and tensors
        why = str(e).split(". ")[0]
    log.warning("a pass of %d sequences ran out of device memory (%s): running it again with %d rows a stack",
                len(seqs), why, runner.stack_rows // 2)
    for s, d in zip(seqs, deferred):
        s.deferred = d
    _release(runner)
    model = runner.engine.model
    saved = runner.stack_rows, runner.one_unit, model.lend_head
    # chunk-sized units halved, no pass as one long unit, no lm_head copied ahead (engine.head_ahead)
    runner.stack_rows, runner.one_unit, model.lend_head = saved[0] // 2, 0, False
    try:
        return runner._grouped(seqs)
    finally:
        runner.stack_rows, runner.one_unit, model.lend_head = saved


def padded_retried(runner: ModelRunner, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
    """``runner._padded(seqs)`` (a decode step); when it runs out of device memory, again once with the cached
    memory released before the error reaches the caller. A decode step's peak is planned, so what fails it is
    memory the allocator holds in pieces (a prompt pass's leftovers); the step rewrites the same keys and values
    and its sequences advance only after it returns."""
    try:
        return runner._padded(seqs)
    except torch.OutOfMemoryError as e:
        why = str(e).split(". ")[0]
    log.warning("a decode step of %d sequences ran out of device memory (%s): running it again with the "
                "allocator's cache released", len(seqs), why)
    _release(runner)
    return runner._padded(seqs)


def _release(runner: ModelRunner) -> None:
    """Drop a failed pass's paged binding and return the allocator's cached blocks to the device."""
    if runner.paged:
        runner.paged[0].abandon()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
