"""Helpers shared by the format loaders: fetching a module's tensors with checked shapes and dtypes,
and turning a GPTQ-style ``g_idx`` into the canonical input permutation."""

from __future__ import annotations

from collections.abc import Callable

import torch

# name -> tensor, or None where the checkpoint has no such tensor
Getter = Callable[[str], torch.Tensor | None]


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def fetch(get: Getter, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
          why: str = "") -> torch.Tensor:
    """``get(name)``, checked: ValueError naming the tensor when it is missing or has another shape/dtype."""
    want = f"{' or '.join(_dt(d) for d in dtypes)} {list(shape)}"
    t = get(name)
    if t is None:
        raise ValueError(f"{name}: missing from the checkpoint; expected {want}{why}")
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        raise ValueError(f"{name}: expected {want}{why}, got {_dt(t.dtype)} {list(t.shape)}")
    return t


def perm_from_g_idx(name: str, g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """The canonical input permutation for a ``g_idx`` (input channel -> group), or None when the
    groups are already contiguous. Act-order (``desc_act``) checkpoints number the groups in the
    order the channels were quantized: sorting the channels by group (stably) makes every group a
    contiguous run of ``group`` packed columns, which must then hold exactly ``group`` channels each."""
    k = g_idx.shape[0]
    contiguous = torch.arange(k, dtype=torch.int64) // group
    gi = g_idx.to(torch.int64)
    if torch.equal(gi, contiguous):
        return None
    perm = torch.argsort(gi, stable=True)
    if not torch.equal(gi[perm], contiguous):
        raise ValueError(f"{name}: expected each of the {k // group} groups to hold {group} input channels "
                         f"(values 0..{k // group - 1}, each {group} times)")
    return perm.to(torch.int32)
