"""Host RAM a run holds beside what the planner places, set on the plan so that the preflight counts it.

The planner (``memory.planner``) places the pinned tier, the prefill's host states, the host lane's KV cache
and the disk tier's ring; ``engine.preflight`` refuses a run whose RAM would not fit. The engine holds more:

* a GGUF embedding of block types kept on the host (not on the device): widened once into the compute dtype
  (``engine.tables``), vocab x hidden x 2 bytes in bf16: 2 GiB for a 70B's 128256 x 8192 (read whole as float32,
  as it was before, it took 4 GiB). A table of a float type is a view of the mapped file and takes nothing here.
* while the resident layers load onto a GPU, a pinned bounce buffer of the largest resident layer per upload
  thread (``streamer.host.upload_all``, up to four: 1.7 GiB for a 7B in bf16, 6.4 GiB for a 70B), freed before
  the pinned tier is filled (``engine.preflight`` counts the larger of the two phases).
* the host lane's converted weights (``engine.host_forms.held_layer_bytes``), which the planner counts per host
  layer (``host_held``), as the lane's KV cache.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from engine.config import ModelConfig
from engine.tables import widens
from memory.plan import Plan
from streamer.host import bounce_bytes

EMBED = "model.embed_tokens.weight"


def host_table_bytes(plan: Plan, ckpt, cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the embedding table ``plan`` keeps in host memory outside the file map: a GGUF block table widened
    to ``dtype`` when the embedding is not on the device (on the CPU device the plan counts it already)."""
    if plan.embed_on_device or not widens(ckpt, EMBED):
        return 0
    return cfg.vocab_size * cfg.hidden_size * dtype.itemsize


def load_bounce_bytes(plan: Plan, device: torch.device, threads: int) -> int:
    """Pinned bounce buffers the resident layers' upload holds while loading onto a GPU (none on the CPU, where the
    resident layers are packed in place)."""
    if device.type != "cuda":
        return 0
    return bounce_bytes([plan.module(f"layers.{i}").bytes for i in plan.resident_layers], threads)


def with_host_bytes(plan: Plan, ckpt, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                    threads: int) -> Plan:
    """``plan`` with the engine's host bytes beside the planner's set (``host_table_bytes``, ``load_bounce_bytes``)."""
    return dataclasses.replace(plan, host_table_bytes=host_table_bytes(plan, ckpt, cfg, dtype),
                               load_bounce_bytes=load_bounce_bytes(plan, device, threads))


def reserve_table(plan_fn, extras, auto: bool) -> tuple:
    """``(plan_fn, plan)``: the host-compute-off plan of ``plan_fn`` (``engine.footprint.plan_model`` with the run's
    settings) with the engine's host bytes (``extras``: :func:`with_host_bytes`). With a default host budget
    (``auto``: no ``--host-budget``), a host table the plan keeps (``host_table_bytes``) comes off the budget and the
    plan is made again, so that the pinned tier leaves it room instead of the preflight refusing a run that a
    smaller tier (more layers read from disk) fits; ``plan_fn`` then carries that budget."""
    plan = extras(plan_fn(host_compute="off"))
    if auto and plan.host_table_bytes:
        plan_fn = functools.partial(plan_fn, host_budget=max(0, plan.host_budget_bytes - plan.host_table_bytes))
        plan = extras(plan_fn(host_compute="off"))
    return plan_fn, plan
