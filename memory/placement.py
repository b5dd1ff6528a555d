"""Where each module goes: how many layers stay resident, which stream, from which tier, and why.

Part of the planner (``memory.planner`` states the rules); plain numbers only.
"""

from __future__ import annotations

from dataclasses import dataclass

from memory.plan import ModulePlan
from memory.sizes import Sizes, all_resident_bytes


@dataclass(frozen=True)
class Residency:
    resident: int  # number of layers kept resident
    lm_head_resident: bool
    embed_on_device: bool
    num_slots: int
    streamed: tuple[int, ...]  # the streamed layers, in execution order


def spread(n: int, k: int) -> tuple[int, ...]:
    """k of the layers 0..n-1, evenly spaced and starting at layer 0."""
    return tuple(j * n // k for j in range(k)) if k else ()


def choose_residency(s: Sizes, budget: int) -> Residency:
    n, tied = s.n, s.tied
    if all_resident_bytes(s) <= budget:
        return Residency(n, True, True, 0, ())
    if not tied and s.fixed + sum(s.layers) + s.lm_head <= budget:
        return Residency(n, True, False, 0, ())  # only the embedding stays on the host
    k_streamed_head, k_resident_head = _head_options(s, budget)
    head = k_resident_head >= 0 and resident_bytes(s, k_resident_head) + s.lm_head >= resident_bytes(s, k_streamed_head)
    return _residency(s, budget, head)


def resident_bytes(s: Sizes, k: int) -> int:
    """Bytes of the layers that stay resident when ``k`` do (the others are ``spread`` out)."""
    streamed = set(spread(s.n, s.n - k))
    return sum(b for i, b in enumerate(s.layers) if i not in streamed)


def _fit(s: Sizes, avail: int) -> int:
    """The most resident layers ``avail`` bytes hold. Layers may differ in size (a GGUF file gives some
    layers more bits): past the count at the largest size, more fit while the chosen ones' bytes do."""
    k = min(s.n, avail // s.layer)
    while k < s.n and resident_bytes(s, k + 1) <= avail:
        k += 1
    return k


def _head_options(s: Sizes, budget: int) -> tuple[int, int]:
    """Resident layers with lm_head streamed, and with it resident (-1: lm_head does not fit)."""
    avail = budget - s.fixed - 2 * s.layer
    assert avail >= 0, "budget was checked against the minimum"
    k_resident_head = _fit(s, avail - s.lm_head) if s.lm_head <= avail else -1
    return _fit(s, avail), k_resident_head


def _residency(s: Sizes, budget: int, head: bool) -> Residency:
    k = _head_options(s, budget)[1 if head else 0]
    assert k < s.n or not head, "everything resident was handled above"
    leftover = budget - s.fixed - 2 * s.layer - resident_bytes(s, k) - (s.lm_head if head else 0)
    return Residency(k, head, head and s.tied, 3 if leftover >= s.layer else 2, spread(s.n, s.n - k))


def other_head_residency(s: Sizes, budget: int, r: Residency) -> Residency | None:
    """The residency with lm_head's other choice (resident instead of streamed, or the reverse) and as
    many resident layers as then fit; None where there is no other choice. The host lane weighs both
    (``memory.host_lane``): a streamed lm_head is copied at the end of a step, beside no host layer."""
    if not r.streamed or _head_options(s, budget)[1] < 0:
        return None
    other = _residency(s, budget, not r.lm_head_resident)
    return other if other.streamed else None


@dataclass(frozen=True)
class Tiers:
    disk_layers: tuple[int, ...]
    lm_head_tier: str  # "vram" | "pinned" | "disk"
    embed_tier: str
    host_pinned: int


DISK_RING = 3  # staging buffers of one slot each through which the disk tier's reads pass (streamer.host.DiskReader)


def assign_tiers(s: Sizes, r: Residency, host_budget: int) -> Tiers:
    """Streamed layers pinned in execution order within ``host_budget``, the rest read from disk; once anything is
    read from disk, its ring of ``DISK_RING`` slot-sized buffers comes out of the budget too (left out, a plan filled
    the RAM it was given and the ring then went past it: 4.9 GiB for a 72B with layers on disk)."""
    tiers = _tiers(s, r, host_budget)
    if tiers.disk_layers or tiers.lm_head_tier == "disk":
        tiers = _tiers(s, r, max(0, host_budget - DISK_RING * s.layer))
    return tiers


def _tiers(s: Sizes, r: Residency, host_budget: int) -> Tiers:
    left, disk, spilled = host_budget, [], False
    for i in r.streamed:  # execution order: the last go to disk first
        if not spilled and s.layers[i] <= left:
            left -= s.layers[i]
        else:
            spilled = True
            disk.append(i)
    head_tier = "vram"
    if not r.lm_head_resident:
        head_tier = "pinned" if not spilled and s.lm_head <= left else "disk"
        left -= s.lm_head if head_tier == "pinned" else 0
    if r.embed_on_device:
        embed_tier = "vram"
    elif s.tied and not r.lm_head_resident:
        embed_tier = head_tier  # one host table is both the embedding and the streamed lm_head
    else:  # only a few rows are read per step: gather them from the mapped file, pin nothing
        embed_tier = "disk"
    return Tiers(tuple(disk), head_tier, embed_tier, host_budget - left)


def module_plans(s: Sizes, r: Residency, t: Tiers, batch: int, chunks: int) -> tuple[ModulePlan, ...]:
    tied, where = s.tied, {"pinned": "pinned host memory", "disk": "the mmap'd checkpoint"}
    if r.embed_on_device:
        why = "tied to the resident lm_head: one GPU copy serves both" if tied and r.resident < s.n \
            else "the whole model fits the budget"
        out = [ModulePlan("embed_tokens", "embedding", s.embed, "resident", "vram", why)]
    else:
        out = [ModulePlan("embed_tokens", "embedding", s.embed, "host", t.embed_tier,
                          f"only the {batch} looked-up row(s) travel per step, from {where[t.embed_tier]}")]
    for i, size in enumerate(s.layers):
        if i not in r.streamed:
            out.append(ModulePlan(f"layers.{i}", "layer", size, "resident", "vram",
                                  "fits the budget (streamed layers are spread between the resident ones)"))
        elif i in t.disk_layers:
            out.append(ModulePlan(f"layers.{i}", "layer", size, "streamed", "disk",
                                  "streamed from the mmap'd checkpoint: the host budget cannot pin it"))
        else:
            out.append(ModulePlan(f"layers.{i}", "layer", size, "streamed", "pinned",
                                  "streamed through the staging slots from pinned host memory"))
    out.append(ModulePlan("norm", "norm", s.norm, "resident", "vram", "always resident (one hidden-sized vector)"))
    if r.lm_head_resident and tied:
        out.append(ModulePlan("lm_head", "lm_head", 0, "resident", "vram", "tied: uses embed_tokens' GPU copy"))
    elif r.lm_head_resident:
        out.append(ModulePlan("lm_head", "lm_head", s.lm_head, "resident", "vram",
                              "fits: saves its bytes every step and needs no chunking"))
    else:
        src = "the host embedding table (tied)" if tied else where[t.lm_head_tier]
        out.append(ModulePlan("lm_head", "lm_head", s.lm_head, "streamed", t.lm_head_tier,
                              f"streamed in {chunks} vocab-row chunks through the staging slots, from {src}"))
    return tuple(out)
