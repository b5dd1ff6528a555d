"""A default host budget leaves room for a host table the plan keeps (engine.host_ram.reserve_room): a GGUF
embedding of block types widened on the host when the embedding is not on the device. Without it, a 70B-shaped
run on a 20 GiB machine was refused (the pinned tier had taken the budget) where a smaller tier fits."""

from __future__ import annotations

import functools

import torch

from engine.config import ModelConfig
from engine.footprint import plan_model, tensor_bytes_from_config
from engine.host_ram import reserve_room, with_host_bytes
from engine.preflight import Machine, PlanBytes, default_host_budget, ram_needed
from engine.synth.presets import resolve_preset
from engine.synth.writer import build_config

GiB = 2**30


class _BlockTables:
    """A checkpoint stand-in whose tensors are GGUF blocks (the embedding is widened on the host)."""

    def widens(self, name: str) -> bool:
        return True


def _plans(ram_gib: float, auto: bool):
    cfg = ModelConfig.from_dict(build_config(resolve_preset("llama-3.1-70b"), "bf16"))
    m = Machine(ram_total=int(ram_gib * GiB), ram_available=int((ram_gib - 1) * GiB), device="cuda")
    plan_fn = functools.partial(plan_model, cfg, tensor_bytes_from_config(cfg, torch.bfloat16), torch.bfloat16,
                                vram_budget=20 * GiB, host_budget=default_host_budget(m, None), max_context=4096,
                                device_free=80 * GiB)
    extras = functools.partial(with_host_bytes, ckpt=_BlockTables(), cfg=cfg, dtype=torch.bfloat16,
                               device=torch.device("cuda"), threads=8)
    return m, reserve_room(plan_fn, extras, auto)[1]


def test_a_default_budget_leaves_the_host_table_room():
    m, given = _plans(20.0, auto=False)  # the budget as given: the table does not fit beside the pinned tier
    assert not given.embed_on_device and given.host_table_bytes == 128256 * 8192 * 2
    assert ram_needed(PlanBytes.of(given), m) > m.limit
    m, auto = _plans(20.0, auto=True)
    assert auto.host_table_bytes == given.host_table_bytes
    assert auto.host_budget_bytes == given.host_budget_bytes - given.host_table_bytes
    assert auto.host_pinned_bytes < given.host_pinned_bytes  # fewer pinned layers, more read from disk
    assert ram_needed(PlanBytes.of(auto), m) <= m.limit


class _FloatTables:
    """A checkpoint stand-in of float tensors: an embedding on the host is a view of the mapped file."""

    def widens(self, name: str) -> bool:
        return False


def test_nothing_changes_without_a_host_table():
    cfg = ModelConfig.from_dict(build_config(resolve_preset("qwen2.5-7b"), "bf16"))
    plan_fn = functools.partial(plan_model, cfg, tensor_bytes_from_config(cfg, torch.bfloat16), torch.bfloat16,
                                vram_budget=6 * GiB, host_budget=16 * GiB, device_free=80 * GiB)
    extras = functools.partial(with_host_bytes, ckpt=_FloatTables(), cfg=cfg, dtype=torch.bfloat16,
                               device=torch.device("cuda"), threads=8)
    fn, plan = reserve_room(plan_fn, extras, True)
    assert not plan.embed_on_device and plan.host_table_bytes == 0
    assert fn is plan_fn and plan.host_budget_bytes == 16 * GiB
