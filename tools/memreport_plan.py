"""The plan side of ``tools/memreport.py``: VRAM categories of a plan, per-module rows with the
checkpoint's header bytes, and "what would have to give" for one more resident layer, found by
re-running the planner (``engine.footprint.plan_model``) on what-if budgets, contexts and batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.footprint import min_budget, plan_model
from engine.quant.layout import LayerQuant
from memory.plan import ALLOCATOR_ALLOWANCE, Plan
from memory.units import format_size
from tools.memreport_measure import logits_bytes


@dataclass(frozen=True)
class PlanInputs:
    """Everything ``plan_model`` needs, so what-ifs can re-plan with one argument changed."""

    cfg: ModelConfig
    tensor_bytes: dict[str, int]  # checkpoint header bytes (or what a file would hold)
    dtype: torch.dtype  # compute dtype
    kwargs: dict = field(default_factory=dict)  # plan_model keyword arguments
    quant: LayerQuant | None = None  # quantized layers (engine.quant.checkpoint.layer_quant)

    def plan(self, **override) -> Plan:
        return plan_model(self.cfg, self.tensor_bytes, self.dtype, self.quant, **{**self.kwargs, **override})

    def pinned_to(self, plan: Plan) -> PlanInputs:
        """The same inputs with the budgets and the prefill chunk ``plan`` resolved (so what-ifs neither re-read
        free memory nor RAM, nor lower the chunk on their own)."""
        kw = {**self.kwargs, "vram_budget": plan.budget_bytes, "host_budget": plan.host_budget_bytes,
              "device_free": None, "prefill_chunk": plan.prefill_chunk, "auto_chunk": False,
              "prefill_states": plan.prefill_state_place}
        return PlanInputs(self.cfg, self.tensor_bytes, self.dtype, kw, self.quant)


def plan_categories(plan: Plan, cfg: ModelConfig) -> dict[str, int]:
    """The plan's VRAM by category; the values sum to ``plan.total_bytes`` plus, when measured, the
    process's memory outside torch's allocator (CUDA context and kernels)."""
    res = {m.name: m.bytes for m in plan.modules if m.placement == "resident"}
    cats = {"resident layers": sum(m.bytes for m in plan.modules if m.kind == "layer" and m.placement == "resident"),
            "embedding": res.get("embed_tokens", 0), "lm_head": res.get("lm_head", 0), "norm": res.get("norm", 0),
            "staging slots": plan.staging_bytes, "KV cache": plan.kv_cache_bytes}
    logits = logits_bytes(cfg.vocab_size, plan.batch)
    rope = 2 * plan.max_context * (cfg.head_dim // 2) * 4
    act = plan.workspace_bytes - plan.prefill_state_bytes - logits - rope - ALLOCATOR_ALLOWANCE
    if act >= 0:
        states = "prompt states (layer-major)" if plan.prefill_state_place == "vram" else \
            "prompt states in flight (the rest in host memory)"
        cats.update({"activations": act, states: plan.prefill_state_bytes, "logits": logits,
                     "rope tables": rope, "allocator allowance": ALLOCATOR_ALLOWANCE})
    else:  # the planner's workspace formula changed: show it whole
        cats["activations/workspace"] = plan.workspace_bytes
    if plan.outside_bytes:
        cats["CUDA context and kernels"] = plan.outside_bytes
    assert sum(cats.values()) == plan.total_bytes + plan.outside_bytes, "VRAM categories must sum to the plan total"
    return cats


def module_rows(plan: Plan, tensor_bytes: dict[str, int]) -> list[dict]:
    """One row per module: the plan's decision and bytes, plus its tensors' bytes in the checkpoint
    headers (``file_bytes``; tied lm_head: 0, its tensor is embed_tokens')."""
    files: dict[str, int] = {}
    for name, b in tensor_bytes.items():
        parts = name.split(".")
        key = (f"layers.{parts[2]}" if name.startswith("model.layers.") else
               {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm",
                "lm_head.weight": "lm_head"}.get(name, name))
        files[key] = files.get(key, 0) + b
    return [{"name": m.name, "kind": m.kind, "placement": m.placement, "tier": m.tier, "bytes": m.bytes,
             "file_bytes": files.get(m.name, 0), "reason": m.reason} for m in plan.modules]


def _units(p: Plan) -> int:
    """Weight bytes that cross PCIe per step besides embedding rows: streamed layers and lm_head."""
    return len(p.streamed_layers) * p.layer_bytes + (0 if p.lm_head_resident else p.module("lm_head").bytes)


def _ok(inputs: PlanInputs, test, **override) -> bool:
    try:
        return test(inputs.plan(**override))
    except ValueError:  # below the minimum budget
        return False


def _smallest(lo: int, hi: int, ok) -> int | None:
    """Smallest x in [lo, hi] with ok(x), for ok False...True; None when not even ok(hi)."""
    if lo > hi or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def _largest(lo: int, hi: int, ok) -> int | None:
    """Largest x in [lo, hi] with ok(x), for ok True...False; None when not even ok(lo)."""
    if lo > hi or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def what_if(inputs: PlanInputs, plan: Plan, device_free: int | None = None) -> dict:
    """What would have to give for one more resident layer (or lm_head), and for no disk reads."""
    inputs = inputs.pinned_to(plan)
    cfg, f = inputs.cfg, format_size
    free = plan.allocator_bytes - plan.total_bytes
    out: dict = {"free_in_budget_bytes": free, "layer_bytes": plan.layer_bytes,
                 "minimum_budget_bytes": min_budget(cfg, inputs.dtype, quant=inputs.quant, batch=plan.batch,
                                                    max_context=plan.max_context,
                                                    prefill_chunk=plan.prefill_chunk,
                                                    host_states=plan.prefill_state_place == "host"),
                 "lines": []}
    if _units(plan) == 0:
        out["lines"].append(f"nothing streams: all {cfg.num_hidden_layers} layers and lm_head are resident; "
                            f"{f(free)} of the budget is free")
        if not plan.embed_on_device:
            out["lines"].append(f"the embedding ({f(plan.module('embed_tokens').bytes)}) stays in host memory: "
                                f"only {plan.batch} row(s) per step cross PCIe, which costs next to nothing")
    else:
        _one_more_resident(inputs, plan, out, device_free)
    if plan.disk_bytes_per_step:
        _no_disk_reads(inputs, plan, out)
    return out


def _one_more_resident(inputs: PlanInputs, plan: Plan, out: dict, device_free: int | None) -> None:
    """Into ``out``: the single changes (budget, context, prefill chunk, batch) that make one more unit resident."""
    cfg, f, lines, units = inputs.cfg, format_size, out["lines"], _units(plan)
    free = out["free_in_budget_bytes"]
    gain = min(plan.layer_bytes, units)
    what = "1 more layer's worth of resident weights" if gain == plan.layer_bytes else "a resident lm_head"
    out["goal"] = what

    def better(p: Plan) -> bool:
        return _units(p) <= units - gain

    hi = plan.budget_bytes + sum(m.bytes for m in plan.modules) + 3 * plan.layer_bytes
    need = _smallest(plan.budget_bytes + 1, hi, lambda b: _ok(inputs, better, vram_budget=b))
    everything = _smallest(plan.budget_bytes + 1, hi, lambda b: _ok(inputs, lambda p: _units(p) == 0,
                                                                     vram_budget=b))
    ctx = _largest(2, plan.max_context - 1, lambda c: _ok(inputs, better, max_context=c))
    chunk = _largest(1, plan.prefill_chunk - 1, lambda c: _ok(inputs, better, prefill_chunk=c))
    batch = _largest(1, plan.batch - 1, lambda b: _ok(inputs, better, batch=b))
    small = min(plan.prefill_chunk, 256)
    both = None if ctx or chunk else _largest(2, plan.max_context - 1, lambda c: _ok(
        inputs, better, max_context=c, prefill_chunk=small))
    out.update(budget_needed_bytes=need, raise_budget_by_bytes=None if need is None else need - plan.budget_bytes,
               all_resident_budget_bytes=everything, context_for_goal=ctx, prefill_chunk_for_goal=chunk,
               batch_for_goal=batch, context_with_small_chunk_for_goal=both)
    lines.append(f"{what} needs {f(gain)}; free in budget {f(free)} "
                 f"({len(plan.resident_layers)}/{cfg.num_hidden_layers} layers resident now)")
    opts = []
    if need is not None:
        after = inputs.plan(vram_budget=need)
        out["tok_s_after"] = after.predicted_tok_s
        over = f" (more than the GPU's {f(device_free)} free)" if device_free and need > device_free else ""
        opts.append(f"raise --vram-budget by {f(need - plan.budget_bytes)} to {f(need)}{over} -> predicted "
                    f"{after.predicted_tok_s:.3g} tok/s (now {plan.predicted_tok_s:.3g})")
    if ctx is not None:
        opts.append(f"lower --context to {ctx} (KV cache {f(plan.kv_cache_bytes)} now)")
    if chunk is not None:
        opts.append(f"lower --prefill-chunk to {chunk} (workspace {f(plan.workspace_bytes)} now; "
                    "slower prefill only)")
    if both is not None:
        opts.append(f"lower --context to {both} and --prefill-chunk to {small} together")
    if batch is not None:
        opts.append(f"lower --batch to {batch}")
    lines += [f"  - {o}" for o in opts] or ["  - no single change of budget, context or batch gets it"]
    if ctx is None and both is None:
        lines.append(f"  (lowering --context alone cannot free {f(gain - free)}: the KV cache is "
                     f"{f(plan.kv_cache_bytes)})")
    if everything is not None:
        lines.append(f"everything resident (nothing streamed) needs --vram-budget {f(everything)}")


def _no_disk_reads(inputs: PlanInputs, plan: Plan, out: dict) -> None:
    """Into ``out``: what is read from the checkpoint files every step, and the host budget that pins it."""
    f = format_size
    total_weights = sum(m.bytes for m in plan.modules)
    host = _smallest(plan.host_budget_bytes + 1, plan.host_budget_bytes + total_weights,
                     lambda h: _ok(inputs, lambda p: p.disk_bytes_per_step == 0, host_budget=h))
    out["host_budget_for_no_disk_bytes"] = host
    tiers = {m.name: m.tier for m in plan.modules}
    what = [f"{len(plan.disk_layers)} layers"] if plan.disk_layers else []
    what += ["lm_head"] if tiers["lm_head"] == "disk" else []
    what += ["embedding rows"] if tiers["embed_tokens"] == "disk" else []
    out["lines"].append(f"{' + '.join(what)} ({f(plan.disk_bytes_per_step)} per step) are read from the checkpoint "
                        "files every step (page cache or disk)" + (
                            f"; pinning them needs --host-budget {f(host)} (now {f(plan.host_budget_bytes)})"
                            if host is not None else ""))
