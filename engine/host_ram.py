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
* while loading, each loading thread's working set converting a layer (``engine.convert_ram``: AWQ, GPTQ, GGUF
  blocks repacked or widened, ``--quantize``): the preflight counts one thread and the loader takes no more threads
  than the RAM left holds (``engine.preflight.loading_threads``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from engine.config import ModelConfig
from engine.convert_ram import Conversion, conversion
from engine.preflight import PlanBytes
from engine.quant.layout import LayerQuant
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
                    threads: int, converts: Callable[[Plan], Conversion] | None = None) -> Plan:
    """``plan`` with the engine's host bytes beside the planner's set (``host_table_bytes``, ``load_bounce_bytes``,
    and with ``converts`` (:func:`engine.convert_ram.conversion` for the run) ``convert_bytes`` / ``convert_what``)."""
    convert, what = converts(plan) if converts is not None else (0, "")
    return dataclasses.replace(plan, host_table_bytes=host_table_bytes(plan, ckpt, cfg, dtype),
                               load_bounce_bytes=load_bounce_bytes(plan, device, threads), convert_bytes=convert,
                               convert_what=what)


def host_extras(ckpt, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, threads: int,
                quant: LayerQuant | None, quant_cache: bool = False) -> Callable[[Plan], Plan]:
    """:func:`with_host_bytes` for a run of ``ckpt`` (its tables, bounce buffers and a loading thread's conversion)."""
    converts = functools.partial(conversion, ckpt=ckpt, cfg=cfg, dtype=dtype, quant=quant, quant_cache=quant_cache)
    return functools.partial(with_host_bytes, ckpt=ckpt, cfg=cfg, dtype=dtype, device=device, threads=threads,
                             converts=converts)


def reserve_room(plan_fn, extras, auto: bool) -> tuple:
    """``(plan_fn, plan)``: the host-compute-off plan of ``plan_fn`` (``engine.footprint.plan_model`` with the run's
    settings) with the engine's host bytes (``extras``: :func:`with_host_bytes`). With a default host budget
    (``auto``: no ``--host-budget``), a host table the plan keeps (``host_table_bytes``) and one loading thread's
    conversion (``convert_bytes``) come off the budget where the pinned tier (and the disk tier's ring) leave them
    no room in it, and the plan is made again, so that the preflight does not refuse a run that a smaller tier (more
    layers read from disk) fits; ``plan_fn`` then carries that budget."""
    plan = extras(plan_fn(host_compute="off"))
    reserve = plan.host_table_bytes + plan.convert_bytes
    p = PlanBytes.of(plan)
    if auto and reserve and p.host_pinned + p.disk_ring + reserve > plan.host_budget_bytes:
        plan_fn = functools.partial(plan_fn, host_budget=max(0, plan.host_budget_bytes - reserve))
        plan = extras(plan_fn(host_compute="off"))
    return plan_fn, plan
