"""A loading thread's working set converting layers (engine.convert_ram): counted by the preflight for one thread,
and bounding how many threads the loader takes (engine.preflight.loading_threads).

* The estimate bounds what converting AWQ / GPTQ layers of Qwen2.5-0.5B shapes measures (tools.convert_ram, in a
  process of its own: the growth of peak RSS while a thread converts layer after layer).
* With the RAM (memory.ram.ram, patched) holding the plan and fewer threads' working sets than --threads, the loader
  takes that many (logged at INFO); with no room for one beside the plan, the CLI refuses in one line, exit 2.
* A default host budget leaves one thread's working set room, as it does a host table.
* Layers that are file bytes as they are (compressed-tensors spans, native GGUF blocks of a Qwen) convert nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.engine as engine_mod
import memory.ram
from engine.config import ModelConfig
from engine.convert_ram import BASE, conversion
from engine.engine import Engine, EngineOptions, open_model
from engine.footprint import plan_model, tensor_bytes_from_config
from engine.host_ram import reserve_room, with_host_bytes
from engine.preflight import SYSTEM_RESERVE, Machine, PlanBytes, loading_threads, ram_needed
from engine.quant.checkpoint import layer_quant
from engine.run import main
from engine.synth.presets import resolve_preset
from engine.synth.writer import build_config
from memory.ram import Ram
from tools.synth import main as synth_main

GiB, MiB = 2**30, 2**20
ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(device="cpu", dtype="bf16", max_context=128, prefill_chunk=64)


def _synth(tmp_path_factory, preset: str, *args: str) -> Path:
    out = tmp_path_factory.mktemp(preset) / "m"
    assert synth_main(["--preset", preset, "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def qwen05(tmp_path_factory):
    """Qwen2.5-0.5B shapes, two layers: ``qwen05(kind)`` in a published quantized format (awq, gptq) or bf16."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = _synth(tmp_path_factory, "qwen2.5-0.5b", "--layers", "2",
                                *(("--quant", kind) if kind != "bf16" else ()))
        return made[kind]
    return get


@pytest.fixture(params=["awq", "gptq"])
def quantized(request, qwen05) -> Path:
    return qwen05(request.param)


@pytest.mark.parametrize("kind,quantize,what", [("awq", None, "AWQ repacking"), ("gptq", None, "GPTQ repacking"),
                                                ("bf16", "int8", "rounding to int8 (--quantize)")])
def test_the_estimate_bounds_the_measured_working_set(qwen05, kind, quantize, what):
    model = qwen05(kind)
    run = subprocess.run([sys.executable, "-m", "tools.convert_ram", str(model), "--json",
                          *(("--quantize", quantize) if quantize else ())],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    files = open_model(model)
    quant = layer_quant(files.ckpt, files.cfg, files.quant, quantize, 128)
    plan = plan_model(files.cfg, {n: i.nbytes for n, i in files.ckpt.tensors.items()}, torch.bfloat16, quant,
                      max_context=128, prefill_chunk=64)
    assert (r["estimate"], r["what"]) == conversion(plan, files.ckpt, files.cfg, torch.bfloat16, quant)
    assert r["what"] == what
    assert r["measured"] > 4 * MiB, r  # the measurement sees the conversion (a 4864 x 896 projection's codes)
    assert r["estimate"] >= r["measured"], r


class _Loaded(Exception):
    """Raised in place of loading: the engine got as far as its weights."""


@pytest.fixture
def load_args(monkeypatch):
    """The (plan, threads) the engine would load with; nothing is loaded."""
    seen = {}

    def weights(ckpt, cfg, plan, device, dtype, threads, **kw):
        seen.update(plan=plan, threads=threads)
        raise _Loaded
    monkeypatch.setattr(engine_mod, "ModelWeights", weights)
    return seen


def _set_ram(monkeypatch, available: int) -> None:
    monkeypatch.setattr(memory.ram, "ram", lambda: Ram(64 * GiB, available))


def _plan_bytes(model: Path, monkeypatch, load_args) -> PlanBytes:
    _set_ram(monkeypatch, 64 * GiB)
    with pytest.raises(_Loaded):
        Engine(open_model(model), EngineOptions(**OPTS, threads=8))
    assert load_args["threads"] == 8  # all of them with RAM to spare
    return PlanBytes.of(load_args["plan"])


def test_the_loader_takes_the_threads_the_ram_holds(quantized, monkeypatch, load_args, caplog):
    p = _plan_bytes(quantized, monkeypatch, load_args)
    assert p.convert >= BASE and "repacking" in p.convert_what
    assert "a thread converting layers" in load_args["plan"].table()
    need = ram_needed(p, Machine(64 * GiB, 64 * GiB, "cpu"))  # the plan and one converting thread
    _set_ram(monkeypatch, SYSTEM_RESERVE + need + 5 * p.convert // 2)  # room for 2.5 more threads' working sets
    with caplog.at_level(logging.INFO, logger="engine.preflight"), pytest.raises(_Loaded):
        Engine(open_model(quantized), EngineOptions(**OPTS, threads=8))
    assert load_args["threads"] == 3
    assert "loading with 3 thread(s) instead of 8" in caplog.text and p.convert_what in caplog.text
    _set_ram(monkeypatch, SYSTEM_RESERVE + need)  # one thread's working set fits, no more
    with pytest.raises(_Loaded):
        Engine(open_model(quantized), EngineOptions(**OPTS, threads=8))
    assert load_args["threads"] == 1


def test_cli_refuses_a_run_without_room_for_one_conversion(quantized, monkeypatch, load_args, capsys):
    p = _plan_bytes(quantized, monkeypatch, load_args)
    need = ram_needed(p, Machine(64 * GiB, 64 * GiB, "cpu"))
    _set_ram(monkeypatch, SYSTEM_RESERVE + need - p.convert // 2)  # the plan fits, a converting thread does not
    load_args.clear()
    rc = main(["--model", str(quantized), "--prompt", "hi", "--device", "cpu", "--dtype", "bf16",
               "--max-context", "128", "--prefill-chunk", "64"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err and "threads" not in load_args
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this run needs "), err
    assert f"for a loading thread converting a layer ({p.convert_what})" in lines[0]
    assert "--vram-budget" in lines[0] and "free some RAM" in lines[0]


@pytest.mark.parametrize("room,threads,fit", [(0, 8, 1), (GiB, 8, 5), (10 * GiB, 8, 8), (10 * GiB, 1, 1)])
def test_loading_threads(room, threads, fit):
    p = PlanBytes(GiB, 2 * GiB, 0, "bfloat16", convert=256 * MiB, convert_what="AWQ repacking")
    m = Machine(64 * GiB, SYSTEM_RESERVE + ram_needed(p, Machine(0, 0)) + room)
    assert loading_threads(p, m, threads) == fit
    assert loading_threads(PlanBytes(GiB, 2 * GiB, 0, "bfloat16"), m, threads) == threads  # nothing converts


def test_a_default_budget_leaves_one_conversion_room():
    cfg = ModelConfig.from_dict(build_config(resolve_preset("qwen2.5-7b"), "bf16"))
    plan_fn = functools.partial(plan_model, cfg, tensor_bytes_from_config(cfg, torch.bfloat16), torch.bfloat16,
                                vram_budget=6 * GiB, host_budget=8 * GiB, device_free=80 * GiB)
    extras = functools.partial(with_host_bytes, ckpt=object(), cfg=cfg, dtype=torch.bfloat16,
                               device=torch.device("cuda"), threads=8, converts=lambda plan: (700 * MiB, "x"))
    given, auto = reserve_room(plan_fn, extras, False)[1], reserve_room(plan_fn, extras, True)[1]
    assert given.convert_bytes == auto.convert_bytes == 700 * MiB
    assert auto.host_budget_bytes == given.host_budget_bytes - 700 * MiB
    assert auto.host_pinned_bytes < given.host_pinned_bytes  # fewer pinned layers, more read from disk
    assert auto.host_pinned_bytes + auto.convert_bytes <= given.host_budget_bytes


@pytest.mark.parametrize("args", [("--quant", "ct-int4"), ("--format", "gguf", "--gguf-type", "Q4_K_M")],
                         ids=["compressed-tensors", "gguf-native"])
def test_file_bytes_as_they_are_convert_nothing(tmp_path_factory, args):
    model = _synth(tmp_path_factory, "tiny-qwen2", *args)
    model = next(model.glob("*.gguf"), model)
    files = open_model(model)
    quant = layer_quant(files.ckpt, files.cfg, files.quant, None, 128)
    plan = plan_model(files.cfg, {n: i.nbytes for n, i in files.ckpt.tensors.items()}, torch.bfloat16, quant)
    assert conversion(plan, files.ckpt, files.cfg, torch.bfloat16, quant) == (0, "")
