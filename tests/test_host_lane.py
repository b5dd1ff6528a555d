"""The host compute lane end to end on the CPU (fp32, torch kernels, tiny models).

A decode step computes the plan's host layers with torch from their pinned host copy, with their
own KV cache in host memory; a prefill streams them. Tokens and logits must equal an all-resident
engine's, for resident / streamed / host mixes, batch 1 and mixed lengths, across a prefill (no host
layers) followed by decode steps (host layers), twice in a row on one engine.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from engine.engine import Engine, EngineOptions, auto_host_mode
from engine.footprint import min_budget
from engine.generate import decode_step, generate, prefill
from engine.host_lane import HostOps
from engine.ops import TorchOps
from engine.run import main
from memory.placement import DISK_RING
from memory.process_vram import outside_allocator
from engine.sampling import SamplingParams
from streamer.stream import WeightStreamer
from streamer.units import UnitSpec
from tests.helpers import make_engine, make_hf_model, random_prompts, rel_max_err

CHUNK = 4
# (name, how many layers stay resident, host budget in layers (None: all pinned), --host-compute)
MIXES = [("streamed+host", 0, None, 1), ("all-host", 0, None, 3), ("resident+host", 1, None, 2),
         ("disk+host", 0, 1, 1)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("host_lane"), tokenizer_dir=tokenizer_dir)
    return d


def _host_engine(model_dir: Path, batch: int, resident: int, host_layers: int | None, n: int) -> Engine:
    probe = make_engine(model_dir, batch=batch)
    low = min_budget(probe.cfg, torch.float32, batch=batch, max_context=64, prefill_chunk=CHUNK)
    layer = probe.plan.layer_bytes
    probe.close()
    host = (1 << 30) if host_layers is None else (host_layers + DISK_RING) * layer  # (the disk tier's ring too)
    return make_engine(model_dir, batch=batch, prefill_chunk=CHUNK, vram_budget=low + resident * layer,
                       host_budget=host, host_compute=n)


def _decode_logits(engine: Engine, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill logits, then the logits of ``steps`` greedy decode steps (each row at its own position)."""
    engine.cache.reset()
    logits = prefill(engine, prompts)
    out, pos = [logits], [len(p) for p in prompts]
    for _ in range(steps):
        logits = decode_step(engine, logits.argmax(-1), pos)
        pos = [p + 1 for p in pos]
        out.append(logits)
    return out


@pytest.mark.parametrize("lengths", [[11], [3, 13, 7]], ids=["batch1", "mixed"])
@pytest.mark.parametrize("mix", MIXES, ids=[m[0] for m in MIXES])
def test_host_layers_match_all_resident(model_dir, mix, lengths):
    _, resident, host_layers, n = mix
    b = len(lengths)
    ref = make_engine(model_dir, batch=b)
    ours = _host_engine(model_dir, b, resident, host_layers, n)
    plan = ours.plan
    assert len(plan.host_layers) == n and len(plan.resident_layers) == resident
    assert not set(plan.host_layers) & set(plan.disk_layers)
    if host_layers is not None:
        assert plan.disk_layers
    prompts = random_prompts(lengths, ref.cfg.vocab_size, seed=11 + b)
    for want, got in zip(_decode_logits(ref, prompts, 5), _decode_logits(ours, prompts, 5)):
        assert rel_max_err(got, want) <= 1e-5
    assert ours.model.host.steps == 5 and ours.model.host.seconds > 0
    ours.model.host.reset_timing()  # what a benchmark does after its warm-up: both counts start again
    assert (ours.model.host.steps, ours.model.host.seconds) == (0, 0.0)
    for _ in range(2):  # a second generate: prefill streams the host layers again, decode skips them
        tokens = generate(ref, prompts, SamplingParams(), max_new_tokens=6).token_ids
        assert generate(ours, prompts, SamplingParams(), max_new_tokens=6).token_ids == tokens
    assert ours.model.host.steps == 10 and ours.model.host.seconds > 0  # 5 decode steps a generate after reset
    ref.close()
    ours.close()


def test_decode_streams_all_but_the_host_layers(model_dir):
    eng = _host_engine(model_dir, 1, 0, None, 1)
    one_pass = sum(u.nbytes for u in eng.weights.units)
    host_bytes = len(eng.plan.host_layers) * eng.plan.layer_bytes
    stats = generate(eng, random_prompts([9], eng.cfg.vocab_size, seed=5), SamplingParams(), max_new_tokens=5).stats
    assert stats["prefill_streamed_bytes"] == one_pass  # a prefill streams every non-resident layer
    assert stats["decode_streamed_bytes_per_step"] == one_pass - host_bytes
    rows = 0 if eng.plan.embed_on_device else eng.cfg.hidden_size * 4  # the plan also counts the embedding row
    assert eng.plan.streamed_bytes_per_step == one_pass - host_bytes + rows
    eng.close()


def test_host_compute_off_and_auto_on_the_cpu_use_no_host_layer(model_dir):
    probe = make_engine(model_dir)
    low = min_budget(probe.cfg, torch.float32, max_context=64, prefill_chunk=2048)
    probe.close()
    off = make_engine(model_dir, vram_budget=low)
    auto = make_engine(model_dir, vram_budget=low, host_compute="auto")
    assert off.plan.host_lane is None and off.model.host is None
    assert auto.plan.host_layers == () and auto.model.host is None and auto.plan.host_lane is None
    assert not any("host lane" in n for n in auto.plan.notes)  # on the CPU auto is off: nothing to say
    off.close()
    auto.close()


def test_auto_plans_a_lane_only_on_a_gpu_with_streamed_layers(model_dir, monkeypatch):
    """``auto`` (the CLI's default) goes on to measure the host only on a CUDA device where layers stream;
    a CPU run, or a model that fits, measures nothing and plans no lane."""
    assert auto_host_mode(torch.device("cuda"), True) == "auto"
    assert auto_host_mode(torch.device("cuda"), False) == "off"
    assert auto_host_mode(torch.device("cpu"), True) == "off"
    seen = []
    real = Engine._host_rate
    monkeypatch.setattr(Engine, "_host_rate", lambda self, mode: seen.append(mode) or real(self, mode))
    eng = make_engine(model_dir, vram_budget=min_budget(make_engine(model_dir).cfg, torch.float32, max_context=64,
                                                         prefill_chunk=2048), host_compute="auto")
    assert eng.plan.streamed_layers and eng.plan.host_lane is None and seen[-1] == "off"
    assert not any("host lane" in n for n in eng.plan.notes)
    eng.close()


def test_the_engine_gives_the_host_lane_only_the_ram_its_plan_leaves(model_dir, monkeypatch):
    """The engine hands the planner the RAM left beside the plan without a lane (engine.preflight.host_lane_ram):
    with none left, forced host layers are refused before anything loads, naming what to lower."""
    import engine.engine as eng_mod
    seen = []
    monkeypatch.setattr(eng_mod, "host_lane_ram", lambda p, m: seen.append(p.host_kv) or 0)
    with pytest.raises(ValueError, match="KV cache of 1 host layers does not fit the RAM.*--max-context"):
        _host_engine(model_dir, 1, 0, None, 1)
    assert seen == [0]  # measured on the plan without host layers


def test_the_cli_computes_host_layers_by_default():
    from engine.run import build_parser
    assert build_parser().parse_args(["--model", "m"]).host_compute == "auto"
    assert build_parser().parse_args(["--model", "m", "--host-compute", "off"]).host_compute == "off"
    from engine.serve import build_parser as serve_parser
    assert serve_parser().parse_args(["--model", "m"]).host_compute == "off"  # the server has no host lane


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (8, 1, 32), (3, 3, 8), (28, 4, 128)])
@pytest.mark.parametrize("starts,lens", [([0, 20, 35], [1, 1, 0]), ([35, 35, 35], [1, 1, 1]), ([35], [1]),
                                         ([35, 35], [1, 0])], ids=["mixed-padded", "equal", "one", "equal-padded"])
def test_host_decode_attention_matches_the_reference(hq, hk, d, dtype, tol, starts, lens):
    """Rows of different lengths (the shorter ones' later positions hidden), rows all as long as the longest (no
    mask built) and padding rows (q_lens 0: zero, the only case the output is multiplied)."""
    gen = torch.Generator().manual_seed(hq * 100 + hk)
    b, s = len(starts), 37
    q = torch.randn((b, 1, hq, d), generator=gen).to(dtype)
    k, v = (torch.randn((b, hk, s, d), generator=gen).to(dtype) for _ in range(2))
    start, q_lens = torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    want = TorchOps().attention(q, k, v, start, q_lens, d ** -0.5, 36)
    got = HostOps().attention(q, k, v, start, q_lens, d ** -0.5, 36)
    assert got.shape == want.shape and rel_max_err(got, want) <= tol
    for row, n in enumerate(lens):
        assert got[row].any() == (n > 0)  # a padded row is zero


@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (2, 3)])
def test_host_kv_append_writes_the_fp32_cache(b, t):
    """HostOps.kv_append_ (by index for one token a row) into the fp32 host cache as TorchOps' scatter does;
    the lane's bf16 query against that cache gives the fp32 attention rounded to bf16."""
    gen = torch.Generator().manual_seed(b * 10 + t)
    k, v = (torch.randn((b, t, 2, 8), generator=gen).to(torch.bfloat16) for _ in range(2))
    start = torch.tensor([5, 0, 11][:b], dtype=torch.int32)
    want = [torch.randn((b, 2, 16, 8), generator=gen) for _ in range(2)]
    got = [c.clone() for c in want]
    TorchOps().kv_append_(k, v, *want, start)
    HostOps().kv_append_(k, v, *got, start)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    q = torch.randn((b, 1, 4, 8), generator=gen)
    q_lens = torch.ones(b, dtype=torch.int32)
    ref = TorchOps().attention(q, *want, start, q_lens, 8 ** -0.5, 16)
    out = HostOps().attention(q.to(torch.bfloat16), *got, start, q_lens, 8 ** -0.5, 16)
    assert out.dtype == torch.bfloat16 and rel_max_err(out, ref) <= 1e-2


def _units(n: int, size: int = 16) -> list[UnitSpec]:
    def pack(j: int):
        return lambda buf: buf.fill_(j + 1)
    return [UnitSpec(f"u{j}", size, "pinned", pack=pack(j)) for j in range(n)]


@pytest.mark.parametrize("order", [[0, 2], [1], [3, 0, 1], []])
def test_streamer_order_skips_units_and_switches_back(order):
    ws = WeightStreamer([], _units(4), 2, 16, "cpu", threads=1)
    for _ in range(2):  # full passes, then the reduced order, then full again
        for j in range(4):
            assert int(ws.slots[ws.acquire(j)][0]) == j + 1
            ws.release()
        ws.set_order(order)
        for _ in range(3):
            for j in order:
                assert int(ws.slots[ws.acquire(j)][0]) == j + 1
                ws.release()
        ws.set_order(range(4))
    ws.close()


@pytest.mark.parametrize("value,fragment", [("maybe", "must be auto, off or a number"), ("-2", "must be auto"),
                                            ("1.5", "must be auto")])
def test_bad_host_compute_is_one_error_line(model_dir, capsys, value, fragment):
    rc = main(["--model", str(model_dir), "--prompt", "hi", "--no-chat", "--device", "cpu", "--max-context", "64",
               f"--host-compute={value}"])
    _, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--host-compute" in errors[0] and fragment in errors[0], err


def test_too_many_host_layers_is_one_error_line(model_dir, capsys):
    probe = make_engine(model_dir)
    low = min_budget(probe.cfg, torch.float32, max_context=64, prefill_chunk=2048)
    probe.close()
    rc = main(["--model", str(model_dir), "--prompt", "hi", "--no-chat", "--device", "cpu", "--max-context", "64",
               "--dtype", "fp32", "--vram-budget", f"{low}B", "--host-compute", "9"])
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1 and "give at most 3" in errors[0], err


def test_the_server_refuses_a_host_lane(capsys):
    assert main(["serve", "--host-compute", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host-compute applies to layerstream runs") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory) -> Path:
    from engine.synth.writer import synthesize
    out = tmp_path_factory.mktemp("host_gpu") / "qwen2.5-0.5b"
    synthesize("qwen2.5-0.5b", out, dtype="fp32", seed=0, layers=8, device="cuda")
    return out


def _gpu_lane_matches_resident(model: Path, kernels: str, batch: int):
    """The host lane's engine against the all-resident one on the GPU, fp32: greedy tokens equal;
    returns the host-lane engine (open) and its generation."""
    base = dict(device="cuda", dtype="fp32", kernels=kernels, max_context=256, batch=batch)
    prompts = [list(range(100 + i, 140 + 3 * i)) for i in range(batch)]
    ref = Engine(model, EngineOptions(**base))
    ref.tokenizer.eos_ids = set()  # fixed-length token streams
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=16).token_ids
    half = ref.plan.total_bytes // 2  # the allocator's share: about half the layers stream
    ref.close()
    del ref
    gc.collect()  # engines hold reference cycles; free the reference's blocks before measuring
    torch.cuda.empty_cache()
    # --vram-budget counts the CUDA context and kernels too: the engine takes them off a given budget
    # (memory.process_vram), so the budget is the allocator's share plus what this process holds outside it
    budget = half + outside_allocator(torch.device("cuda")).bytes
    ours = Engine(model, EngineOptions(**base, vram_budget=budget, host_compute=2))
    assert len(ours.plan.host_layers) == 2 and (ours.graph is not None) == (kernels == "triton")
    assert set(ours.plan.streamed_layers) - set(ours.plan.host_layers) and ours.plan.outside_bytes > 0  # all 3 lanes
    ours.tokenizer.eos_ids = set()
    gen = generate(ours, prompts, SamplingParams(), max_new_tokens=16)
    assert gen.token_ids == want
    assert ours.model.host.steps >= 15
    return ours, gen


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("batch", [1, 3])
def test_host_lane_on_the_gpu_matches_resident(gpu_model, kernels, batch):
    """GPU path: host layers run on the CPU between the decode graph's pieces (triton) or the eager
    layers (torch); fp32 so that the CPU's and the GPU's matmuls agree to rounding."""
    ours, gen = _gpu_lane_matches_resident(gpu_model, kernels, batch)
    per_step = sum(u.nbytes for u in ours.weights.units) - 2 * ours.plan.layer_bytes
    assert gen.stats["decode_streamed_bytes_per_step"] == per_step
    ours.close()


@pytest.mark.cuda
@pytest.mark.parametrize("form", ["int4", "widened"])
def test_quantized_host_layers_on_the_gpu_match_resident(tmp_path_factory, monkeypatch, form):
    """AWQ layers: the GPU's fused int4 kernels and the host lane's layers (torch's CPU int4 kernel, or
    widened once: engine.host_forms) give the same greedy tokens, fp32."""
    from engine.synth.writer import synthesize

    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", form)
    out = tmp_path_factory.mktemp("host_gpu_awq") / "qwen2.5-0.5b-awq"
    synthesize("qwen2.5-0.5b", out, seed=0, layers=8, device="cuda", quant="awq")
    ours, _ = _gpu_lane_matches_resident(out, "triton", 2)
    assert ours.model.host.weight_form == form and ours.model.host.held_bytes > 0
    ours.close()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hk,d", [(1, 28, 4, 128), (3, 4, 2, 16), (2, 3, 3, 8)])
def test_host_decode_rope_equals_the_reference_bit_for_bit(dtype, b, hq, hk, d):
    """HostOps.rope_ (one roll, the tables cast once) against TorchOps.rope_, on q and k as views into one fused
    qkv row (their real strides), at positions past the first ones."""
    from engine.model import rope_tables

    cos, sin = rope_tables(d, 4096, 1e6, None)
    gen = torch.Generator().manual_seed(b * 100 + hq)
    qkv = torch.randn((b, 1, (hq + 2 * hk) * d), generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (b, 1), generator=gen)
    got, want = qkv.clone(), qkv.clone()
    for t, ops in ((got, HostOps()), (want, TorchOps())):
        q = t[..., : hq * d].view(b, 1, hq, d)
        k = t[..., hq * d: (hq + hk) * d].view(b, 1, hk, d)
        ops.rope_(q, k, cos, sin, positions)
    assert torch.equal(got, want)
    assert not torch.equal(got, qkv)  # it did rotate
