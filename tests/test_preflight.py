"""The RAM preflight (engine/preflight.py) with small fake memory figures, and through the CLI: a run that
cannot fit is refused in one line before any weight is read; on the CPU fp32 gives way to the checkpoint's
dtype when it does not fit; the README's 7B example on a 24 GiB CPU machine."""

from __future__ import annotations

import json

import pytest
import torch

import engine.cli_session as cli_session
from engine.config import ModelConfig
from engine.preflight import (PROCESS_BYTES, InsufficientMemoryError, Machine, PlanBytes, check_fits,
                              cpu_dtype_note, default_host_budget, host_lane_ram, ram_needed)
from engine.run import main
from engine.synth.presets import resolve_preset
from engine.synth.writer import build_config
from engine.footprint import plan_model, tensor_bytes_from_config

GiB = 2**30
MiB = 2**20


def fake(total_gib: float, avail_gib: float, device: str = "cpu") -> Machine:
    return Machine(ram_total=int(total_gib * GiB), ram_available=int(avail_gib * GiB), device=device)


def test_margin_and_usable():
    assert fake(8, 6).margin == 2 * GiB and fake(8, 6).usable == 4 * GiB
    assert fake(64, 40).margin == int(6.4 * GiB) and fake(64, 40).usable == int(40 * GiB) - int(6.4 * GiB)
    assert fake(4, 1).usable == 0


@pytest.mark.parametrize("device,device_total,pinned,fits", [
    ("cpu", 4 * GiB + 512 * MiB, 0, True), ("cpu", 4 * GiB + 600 * MiB, 0, False), ("cpu", 2 * GiB, 2 * GiB, True),
    ("cpu", 3 * GiB, 2 * GiB, False), ("cuda", 40 * GiB, 4 * GiB, True), ("cuda", GiB, 4 * GiB + 600 * MiB, False),
])
def test_check_fits(device, device_total, pinned, fits):
    m = fake(8, 6, device)  # refused past 6 - 1 = 5 GiB; the process counts 0.5 GiB
    p = PlanBytes(device_total, pinned, 0, "float32")
    assert m.limit == 5 * GiB and (ram_needed(p, m) <= m.limit) == fits
    if fits:
        check_fits(p, m, host_budget_given=False)
        return
    with pytest.raises(InsufficientMemoryError) as exc:
        check_fits(p, m, host_budget_given=True)
    msg = str(exc.value)
    assert "\n" not in msg and "5.00 GiB can be used" in msg and "6.00 GiB available" in msg
    assert f"needs {ram_needed(p, m) / GiB:.2f} GiB" in msg
    if device == "cpu":
        assert "--dtype bf16" in msg and "--vram-budget" in msg
    else:
        assert "--host-budget" in msg and "--dtype" not in msg


def test_the_host_lanes_kv_cache_counts_in_the_ram_and_gets_what_is_left():
    m = fake(8, 6, "cuda")  # 5 GiB may be used; the process takes 0.5
    without = PlanBytes(GiB, 3 * GiB, 0, "bfloat16")
    assert host_lane_ram(without, m) == int(1.5 * GiB)
    assert host_lane_ram(PlanBytes(GiB, 5 * GiB, 0, "bfloat16"), m) == 0  # never negative
    check_fits(PlanBytes(GiB, 3 * GiB, 0, "bfloat16", host_kv=int(1.5 * GiB)), m, host_budget_given=False)
    with pytest.raises(InsufficientMemoryError, match=r"3.00 GiB of streamed layers in host memory \+ 2.00 GiB of KV "
                       r"cache for the host lane's layers.*fewer --host-compute layers \(or off\)"):
        check_fits(PlanBytes(GiB, 3 * GiB, 0, "bfloat16", host_kv=2 * GiB), m, host_budget_given=False)


def test_default_host_budget_shares_ram_with_the_cpu_budget():
    m = fake(24, 22)
    assert default_host_budget(m, None) == m.usable - PROCESS_BYTES
    assert default_host_budget(fake(24, 22, "cuda"), 6 * GiB) == m.usable - PROCESS_BYTES  # VRAM is not RAM
    assert default_host_budget(m, 6 * GiB) == m.usable - 6 * GiB - PROCESS_BYTES
    assert default_host_budget(m, 100 * GiB) == 0
    for vram in (None, 6 * GiB):  # a plan that fills the default host budget still passes the check
        pinned = default_host_budget(m, vram)
        check_fits(PlanBytes(vram or 0, pinned, 0, "bfloat16"), m, host_budget_given=False)


@pytest.mark.parametrize("device_total,disk,given,switch", [
    (2 * GiB, 0, False, False), (5 * GiB, 0, False, True), (2 * GiB, GiB, False, True), (2 * GiB, GiB, True, False),
])
def test_cpu_dtype_note(device_total, disk, given, switch):
    note = cpu_dtype_note(PlanBytes(device_total, 0, disk, "float32"), fake(8, 6), "bfloat16", given)
    assert (note is not None) == switch
    if note:
        assert "bfloat16 instead of fp32" in note and "--dtype fp32" in note
    assert cpu_dtype_note(PlanBytes(5 * GiB, 0, 0, "float32"), fake(8, 6), "float32", False) is None


def _qwen7b_plan(dtype, m: Machine, vram=None):
    cfg = ModelConfig.from_dict(build_config(resolve_preset("qwen2.5-7b"), "bf16"))
    return PlanBytes.of(plan_model(cfg, tensor_bytes_from_config(cfg, torch.bfloat16), dtype, vram_budget=vram,
                                  host_budget=default_host_budget(m, vram)))


def test_readme_7b_example_on_a_24gib_cpu_machine():
    """24 GiB RAM, 22 GiB available: fp32 (30 GB) cannot fit and is refused in one line; the checkpoint's
    bf16 fits whole; with --vram-budget 6GiB the host tier takes what is left and the whole run fits."""
    m = fake(24, 22)
    fp32 = _qwen7b_plan(torch.float32, m)
    with pytest.raises(InsufficientMemoryError, match="--dtype bf16"):
        check_fits(fp32, m, host_budget_given=False)
    assert cpu_dtype_note(fp32, m, "bfloat16", False) is not None
    check_fits(_qwen7b_plan(torch.bfloat16, m), m, host_budget_given=False)
    streamed = _qwen7b_plan(torch.float32, m, vram=6 * GiB)
    check_fits(streamed, m, host_budget_given=False)
    assert streamed.disk_per_step > 0  # fp32 at 6 GiB reads layers from disk -> auto picks bf16
    assert cpu_dtype_note(streamed, m, "bfloat16", False) is not None
    bf16 = _qwen7b_plan(torch.bfloat16, m, vram=6 * GiB)
    check_fits(bf16, m, host_budget_given=False)
    assert bf16.disk_per_step == 0


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def ram(monkeypatch):
    """Set the RAM the engine sees: ram(total, available) in bytes."""
    def set_ram(total: int, available: int) -> None:
        monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device: cls(total, available, device)))
    return set_ram


def test_cli_refuses_a_run_that_cannot_fit_ram(capsys, ram, tiny_qwen2_dir, monkeypatch):
    ram(2 * GiB + 600 * MiB, GiB + 100 * MiB)  # 100 MiB can be used: less than the process itself
    import streamer.stream

    def refuse(*a, **k):
        raise AssertionError("weights were about to be loaded")
    monkeypatch.setattr(streamer.stream.WeightStreamer, "__init__", refuse)
    rc = main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--device", "cpu", "--dtype", "fp32"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this run needs ") and "of RAM" in lines[0], err
    assert "100.00 MiB can be used" in lines[0] and "--max-context" in lines[0]


def test_cli_auto_dtype_falls_back_to_bf16_when_fp32_does_not_fit(capsys, ram, tiny_qwen2_dir):
    files = cli_session.open_model(tiny_qwen2_dir)
    tb = {n: i.nbytes for n, i in files.ckpt.tensors.items()}
    need = {d: plan_model(files.cfg, tb, d, max_context=128, prefill_chunk=64).total_bytes + PROCESS_BYTES
            for d in (torch.float32, torch.bfloat16)}
    assert need[torch.bfloat16] < need[torch.float32]
    usable = (need[torch.bfloat16] + need[torch.float32]) // 2
    ram(8 * GiB, 2 * GiB + usable)  # margin 2 GiB: bf16 fits, fp32 does not
    argv = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--device", "cpu", "--max-context", "128",
            "--prefill-chunk", "64", "--max-new-tokens", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "note: computing in the checkpoint's bfloat16 instead of fp32" in err
    assert "plan: CPU run in bfloat16" in err
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["dtype"] == "bfloat16"
    ram(8 * GiB, GiB + usable)  # the same amount past the 1 GiB system reserve: insisting on fp32 is refused
    assert main([*argv, "--dtype", "float32"]) == 2
    assert capsys.readouterr().err.startswith("error: this run needs ")


@pytest.mark.parametrize("exc", [RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                                              "allocate 26102472704 bytes. Error code 12 (Cannot allocate memory)"),
                                 MemoryError()])
def test_an_allocation_failure_while_running_is_one_line(capsys, tiny_qwen2_dir, monkeypatch, exc):
    """Should RAM run out anyway (something else took it after the preflight), no allocator traceback."""
    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(cli_session, "Engine", fail)
    rc = main(["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of RAM") and "--max-context" in lines[0], err


def test_the_disk_tiers_ring_counts_in_the_ram():
    """A plan reading anything from disk stages it through a ring of slot-sized buffers (memory.placement.DISK_RING),
    counted and named in the check (left out, a 72B with layers on disk needed 4.9 GiB more than was checked)."""
    from types import SimpleNamespace

    from memory.placement import DISK_RING
    plan = SimpleNamespace(total_bytes=GiB, host_pinned_bytes=int(3.5 * GiB), disk_bytes_per_step=GiB,
                           dtype="bfloat16", host_lane=None, slot_bytes=GiB // 2, disk_layers=(7, 8))
    p = PlanBytes.of(plan)
    assert p.disk_ring == DISK_RING * GiB // 2
    assert PlanBytes.of(SimpleNamespace(**{**vars(plan), "disk_layers": (), "disk_bytes_per_step": 0})).disk_ring == 0
    with pytest.raises(InsufficientMemoryError, match=r"1.50 GiB of staging for the layers read from disk"):
        check_fits(p, fake(8, 6, "cuda"), host_budget_given=False)  # 5 GiB may be used: 3.5 + 1.5 + 0.5
