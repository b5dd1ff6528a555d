"""Load a model directory into a runnable engine: config, checkpoint, plan, weights, model."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.checkpoint import Checkpoint, check_layer_count
from engine.cpu_widen import widen_resident
from engine.config import ModelConfig
from engine.footprint import plan_model
from engine.gguf import open_gguf
from engine.gguf.paths import is_gguf_path
from engine import ahead, generation_defaults
from engine.graphs import try_capture
from engine.host_forms import PACKED, held_layer_bytes, packed_per_widened, pick_form, weight_forms
from engine.host_ram import host_extras, reserve_room
from engine.host_extra import EXTRA_CONTEXT, layer_extra_s
from engine.host_lane import HostLane
from engine.lane_guard import keep_host_rate
from engine.host_worker import machine_pick, run_pinned
from engine.kv_cache import KVCache
from engine.layout import expected_tensors
from engine.mlp_chunks import mlp_budget
from engine.model import Model
from engine.ops import make_ops
from engine.options import EngineOptions, auto_host_mode, pick_device, pick_dtype
from engine.preflight import Machine, PlanBytes, fit_loading, host_lane_ram
from engine.quant.checkpoint import layer_quant, read_quantization, validate_quant_checkpoint
from engine.quant.config import QuantizationConfig
from engine.tokenizer import Tokenizer
from engine.weights import ModelWeights
from memory.allocator_cap import AllocatorCap, prefer_expandable_segments
from memory.bandwidth import h2d_bandwidth
from memory.host_lane import parse_host_compute
from memory.host_rate import host_gemv_rate
from memory.process_vram import Outside, outside_allocator

log = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    """A model directory checked without reading weights: config, safetensors headers, tokenizer."""

    model_dir: Path
    cfg: ModelConfig
    ckpt: Checkpoint
    tokenizer: Tokenizer
    quant: QuantizationConfig | None = None  # config.json's quantization_config
    sampling: dict = field(default_factory=dict)  # the authors' sampling settings (engine.generation_defaults)


def open_model(model_dir: str | Path) -> ModelFiles:
    """Check a model directory in order (config, checkpoint headers against it, tokenizer).

    A ``.gguf`` file (or a directory holding one, or the first part of a split set) is read
    by ``engine.gguf`` instead: config, tokenizer and weights all come from the file.
    """
    model_dir = Path(model_dir)
    if is_gguf_path(model_dir):
        cfg, gguf_ckpt, tokenizer = open_gguf(model_dir)  # imports the gguf package (GGUF models only)
        return ModelFiles(model_dir, cfg, gguf_ckpt, tokenizer,
                          sampling=generation_defaults.from_gguf(gguf_ckpt.metadata, str(gguf_ckpt.model_dir)))
    cfg = ModelConfig.from_file(model_dir / "config.json")
    quant = read_quantization(model_dir)
    ckpt = Checkpoint(model_dir)
    check_layer_count(ckpt.tensors, cfg.num_hidden_layers, f"checkpoint {model_dir} does not match its config.json")
    if quant is None:
        ckpt.validate(expected_tensors(cfg))
    else:
        validate_quant_checkpoint(ckpt, cfg, quant)
    return ModelFiles(model_dir, cfg, ckpt, Tokenizer.from_dir(model_dir), quant,
                      sampling=generation_defaults.from_dir(model_dir))


class Engine:
    """A loaded model: ``engine.generate`` (see engine.generate) runs it."""

    def __init__(self, model: str | Path | ModelFiles, opts: EngineOptions | None = None, progress=None) -> None:
        opts = opts or EngineOptions()
        self.opts = opts
        # seconds of each start-up phase (--json stats' startup_s: where a first run's extra time goes)
        self.startup_s: dict[str, float] = {}
        self.prefill_compile_s = 0.0  # the last prefill's compile-ahead dry pass (engine.generate.prefill)
        t0 = time.perf_counter()
        self.device = pick_device(opts.device)
        if self.device.type == "cuda":
            prefer_expandable_segments()  # before the first weight: a pass's activations must not fragment the cap
        files = model if isinstance(model, ModelFiles) else open_model(model)
        self.startup_s["open"] = time.perf_counter() - t0
        self.model_dir, self.cfg, self.ckpt, self.tokenizer = files.model_dir, files.cfg, files.ckpt, files.tokenizer
        self.dtype = pick_dtype(opts.dtype, self.ckpt.dtype, self.device)
        self.quant = layer_quant(self.ckpt, self.cfg, files.quant, opts.quantize, opts.quant_group)
        kernels = opts.kernels if opts.kernels != "auto" else ("triton" if self.device.type == "cuda" else "torch")
        self.ops = make_ops(kernels)
        if opts.max_context < 2:
            raise ValueError(f"--max-context must be at least 2, got {opts.max_context}")
        t0 = time.perf_counter()
        self.plan = self._plan()
        self.startup_s["plan"] = time.perf_counter() - t0
        opts.prefill_chunk = self.plan.prefill_chunk  # lower than asked only with prefill_chunk_auto (a plan note)
        if self.plan.scratch_bytes:
            self.ops.use_scratch(self.plan.scratch_bytes)  # the dense tile of packed layers the plan holds
        self.ops.mlp_budget = mlp_budget(self.cfg, opts.prefill_chunk, self.dtype.itemsize,  # longer stacks: pieces
                                         self.plan.prefill_state_bytes)
        self.load_threads = fit_loading(PlanBytes.of(self.plan), Machine.probe(self.device.type), opts.threads,
                                        opts.host_budget is not None and not opts.host_budget_auto)
        self.cap = None  # set before the first weight reaches the GPU; released by close()
        if opts.cap_allocator and opts.vram_budget is not None and self.device.type == "cuda":
            self.cap = AllocatorCap(self.device, self.plan.allocator_bytes)
        ahead.prestart(self.device, self.ops.name)  # warms up while weights load
        try:
            self._load(progress)
        except BaseException:
            if self.cap is not None:
                self.cap.release()
            raise

    def _load(self, progress) -> None:
        """Weights (resident ones onto the GPU), model, KV cache and the decode graph."""
        opts = self.opts
        start = time.perf_counter()
        self.weights = ModelWeights(self.ckpt, self.cfg, self.plan, self.device, self.dtype,
                                     threads=self.load_threads, progress=progress, trace=opts.trace, quant=self.quant,
                                     quant_cache=opts.quant_cache)
        self.startup_s["weights"] = time.perf_counter() - start
        self.quant_note = None  # for the CLI: how long converting / quantizing the layers took
        if self.quant is not None:
            how = "copied as they are" if self.quant.native else "repacked from the checkpoint" \
                if self.quant.source or self.quant.loader else "rounded to nearest on the host"
            self.quant_note = (f"weights loaded with the layers as {self.quant.label} ({how}) in "
                               f"{time.perf_counter() - start:.1f} s")
            log.info(self.quant_note)
            widened = self.ops.name == "torch" and widen_resident(  # Triton kernels read the packed form
                self.weights, self.dtype, opts.vram_budget is not None or bool(opts.quantize))
            if widened:
                self.quant_note += f"; {widened}"
        self.model = Model(self.cfg, self.weights, self.ops, self.device, self.dtype, opts.max_context)
        self.model.host_states = self.plan.prefill_state_place == "host"
        self.cache = KVCache(self.cfg, opts.batch, opts.max_context, self.dtype, self.device)
        if self.plan.host_layers:
            self.model.host = HostLane(self.cfg, self.weights, self.cache, opts.max_context,
                                       weight_form=self.host_weights)
        self.graph = None
        self.prefill_shapes: set[tuple[int, ...]] = set()  # prompt shapes compiled ahead (engine/ahead.py)
        t0 = time.perf_counter()
        shape = ahead.decode(self.model, self.cache, opts.batch, opts.first_prompts, opts.prefill_chunk,
                             self.ops.prompt_chunk)
        if shape is not None:  # the first prompts' prefill compiled beside the decode step's kernels
            self.prefill_shapes.add(shape)
        t1 = time.perf_counter()
        if opts.cuda_graph and self.device.type == "cuda" and self.ops.name == "triton":
            self.graph = try_capture(self.model, self.cache, opts.batch)
        self.startup_s.update(compile_ahead=t1 - t0, graphs=time.perf_counter() - t1)

    def _plan(self):
        free, outside = None, Outside(0, "")
        if self.device.type == "cuda":
            outside = outside_allocator(self.device)  # the context and cuBLAS, before anything else allocates
            free, _ = torch.cuda.mem_get_info(self.device)
            log.info("GPU memory outside torch's allocator: %d MiB (%s)", outside.bytes >> 20, outside.source)
        t0 = time.perf_counter()
        gbps, source = h2d_bandwidth(self.device)
        self.startup_s["measure_h2d"] = time.perf_counter() - t0  # part of "plan": cached after a first run
        mode = parse_host_compute(self.opts.host_compute)
        plan = functools.partial(
            plan_model, self.cfg, {n: i.nbytes for n, i in self.ckpt.tensors.items()}, self.dtype, self.quant,
            vram_budget=self.opts.vram_budget, host_budget=self.opts.host_budget, batch=self.opts.batch,
            max_context=self.opts.max_context, prefill_chunk=self.opts.prefill_chunk,
            auto_chunk=self.opts.prefill_chunk_auto, device_free=free, h2d_gbps=gbps, h2d_source=source,
            outside_bytes=outside.bytes, prefill_states=self.opts.prefill_states)
        extras = host_extras(self.ckpt, self.cfg, self.dtype, self.device, self.opts.threads, self.quant,
                             self.opts.quant_cache)  # the engine's own host bytes
        # a host lane's KV cache may take the RAM this plan leaves; a default budget leaves a host table and a
        # loading thread's conversion room
        plan, without = reserve_room(plan, extras, self.opts.host_budget_auto or self.opts.host_budget is None)
        if mode == "auto":
            mode = auto_host_mode(self.device, bool(without.streamed_layers))
        t0 = time.perf_counter()
        host_gbps, host_source = self._host_rate(mode)
        extra = self._host_extra(host_gbps, host_source) if mode != "off" else 0.0
        self.startup_s["measure_host"] = time.perf_counter() - t0  # part of "plan": the host lane's rates
        if mode != "off":
            ram = host_lane_ram(PlanBytes.of(without), Machine.probe(self.device.type))
            plan = extras(plan(host_compute=mode, host_gbps=host_gbps, host_source=host_source, host_extra_s=extra,
                               host_ram=ram, host_held=held_layer_bytes(self.cfg, self.dtype, self.quant,
                                                                        self.host_weights)))
        else:
            plan = without
        note = getattr(self.ckpt, "plan_note", None)  # GGUF: which tensors stay packed, which are widened
        if note is not None:
            head_blocks = self.quant is not None and self.quant.native_head is not None
            plan = replace(plan, notes=(*plan.notes, note(self.quant.label if self.quant else None, head_blocks)))
        return plan

    def _host_rate(self, mode) -> tuple[float | None, str]:
        """The host's GEMV GB/s at this batch and dtype, in the plan's layer bytes (measured once, cached),
        when the host lane may be used (on a GPU); sets ``host_weights``, the form host layers take
        (engine.host_forms: the faster measured one, or the preferred one when none is measured). A forced
        ``--host-compute N`` on GGUF blocks that no form can hold is a ValueError."""
        if mode == "off":  # (LAYERSTREAM_HOST_WEIGHTS is not looked at)
            self.host_weights = ""
            return None, "not measured: host compute off"
        forms = weight_forms(self.cfg, self.dtype, self.quant)
        self.host_weights = forms[0]
        if forms == (PACKED,) and self.quant.native and mode not in ("auto", 0):
            raise ValueError(f"--host-compute {mode}: this GGUF's layers are held as their {self.quant.label}, "
                             "which the CPU has no kernel for, and too little RAM is available to widen them "
                             "once (every call would widen whole layers); drop --host-compute, or set "
                             "LAYERSTREAM_GGUF_NATIVE=0 to repack the layers instead")
        if self.device.type != "cuda" or forms == (PACKED,):
            why = ("the compute device is the CPU" if self.device.type != "cuda" else
                   "quantized layers the CPU has no fast form for (no int4 kernel, and too little RAM to widen them)")
            return None, f"not measured: {why}"
        ratio = packed_per_widened(self.cfg, self.dtype, self.quant) if self.quant is not None else 1.0
        # next to H2D copies, as the lane runs; on the worker's cores with its thread count (a disk tier,
        # which takes one more core, is not known yet)
        rate = functools.partial(host_gemv_rate, contend=self.device)
        pick = functools.partial(pick_form, forms, self.quant, self.dtype, rate=rate, packed_per_widened=ratio)
        self.host_weights, gbps, source = run_pinned(machine_pick(disk_tier=False), pick, self.opts.batch)
        if self.quant is not None:
            source += f"; host layers {self.host_weights}"
        return gbps, source

    def _host_extra(self, host_gbps: float | None, host_source: str) -> float:
        """A host layer's seconds beyond its projections at this batch (engine.host_extra, on the lane's cores),
        for a measured GEMV rate; 0 without one, or for a rate the lane achieved (it holds that time already)."""
        if host_gbps is None or host_source.startswith("achieved"):
            return 0.0
        context = min(EXTRA_CONTEXT, self.opts.max_context)
        extra = run_pinned(machine_pick(disk_tier=False), layer_extra_s, self.cfg, self.dtype, self.opts.batch, context)
        log.info("host layer beyond its projections: %.2f ms (batch %d, %d positions)", extra * 1e3,
                 self.opts.batch, context)
        return extra

    def close(self) -> None:
        """Stop the host lane's worker; release the weight sources (file maps, disk readers) and the allocator cap."""
        try:
            if getattr(self, "model", None) is not None and self.model.host is not None:
                keep_host_rate(self)
                self.model.host.close()
        finally:  # also after a Ctrl-C there (raised once the worker has stopped)
            self.weights.close()
            if self.cap is not None:
                self.cap.release()
