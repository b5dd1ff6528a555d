"""Quantized checkpoints end to end on the CPU (fp32 compute) against transformers.

Each tiny model (Qwen2, Qwen3, Llama) is quantized by the writers of tests/quant_packers.py (AWQ
and GPTQ packed from their published layouts, compressed-tensors by its own package); the
reference is the transformers model carrying the *dequantized* weights. Checked: prefill and decode
logits (resident), greedy tokens (resident, streamed from pinned memory and from disk), the plan's
packed layer bytes and format label, ``--quantize`` (round to nearest at load), the Triton kernels
under the interpreter, and the errors for bad quantized checkpoints.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine.engine import Engine
from engine.footprint import min_budget
from engine.generate import generate
from engine.kv_cache import KVCache
from engine.layout import LayerLayout
from engine.quant.layout import QuantLayerLayout
from engine.quant.rtn import quantize_rtn
from engine.quant.spec import dequantize
from engine.sampling import SamplingParams
from tests.helpers import (LAYERS, forward_decode, forward_prefill, hf_greedy, make_engine, make_hf_model,
                           random_prompts, rel_max_err)
from tests.quant_packers import FORMATS, quantize_model_dir

TOL = 1e-4  # fp32 compute, torch kernels: relative to max |ref logits|
TRITON_TOL = 1e-3
FAMILIES = ("qwen2", "qwen3", "llama")


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory, tokenizer_dir):
    """``qmodel(family, fmt) -> (transformers model on dequantized weights, quantized model dir)``."""
    built = {}

    def get(family: str, fmt: str):
        if (family, fmt) not in built:
            tmp = tmp_path_factory.mktemp("quant")
            ref, d = make_hf_model(family, tmp, tokenizer_dir=tokenizer_dir, seed=300 + FAMILIES.index(family))
            deq = quantize_model_dir(d, tmp / f"{family}-{fmt}", fmt)
            sd = ref.state_dict()
            with torch.no_grad():
                for name, w in deq.items():
                    sd[name].copy_(w)
            built[family, fmt] = (ref, tmp / f"{family}-{fmt}")
        return built[family, fmt]

    return get


def _check_logits(engine: Engine, ref, tol: float, seed: int) -> None:
    cfg = engine.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(ids).logits.float()
    cache = KVCache(cfg, 2, 32, torch.float32, "cpu")
    out = forward_prefill(engine.model, cache, ids[:, :7], last_only=False)
    assert rel_max_err(out, want[:, :7]) <= tol
    for t in range(7, 11):
        assert rel_max_err(forward_decode(engine.model, cache, ids[:, t], t), want[:, t]) <= tol, f"position {t}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_dequantized_weights(qmodel, family: str, fmt: str) -> None:
    ref, d = qmodel(family, fmt)
    engine = make_engine(d, max_context=32)
    assert engine.quant is not None and engine.quant.source is not None
    _check_logits(engine, ref, TOL, seed=FORMATS.index(fmt))
    engine.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_resident_and_streamed(qmodel, fmt: str) -> None:
    ref, d = qmodel("qwen2", fmt)
    eng = make_engine(d)
    prompt = random_prompts([6], eng.cfg.vocab_size, seed=5)[0]
    want = hf_greedy(ref, prompt, 12)
    assert generate(eng, [prompt], SamplingParams(), max_new_tokens=12).token_ids[0] == want
    low = min_budget(eng.cfg, torch.float32, max_context=64, prefill_chunk=2048, quant=eng.quant)
    eng.close()
    for host in (1 << 30, 0):  # pinned host tier, then every layer from disk
        s = make_engine(d, vram_budget=low, host_budget=host)
        assert s.plan.streamed_layers and not s.plan.resident_layers, s.plan.table()
        assert generate(s, [prompt], SamplingParams(), max_new_tokens=12).token_ids[0] == want, f"host={host}"
        s.close()


def test_plan_counts_packed_bytes(qmodel) -> None:
    _, d = qmodel("qwen2", "awq")
    eng = make_engine(d)
    packed = QuantLayerLayout.build(eng.cfg, torch.float32, eng.quant).nbytes
    dense = LayerLayout.build(eng.cfg, torch.float32).nbytes
    assert packed < dense / 4  # int4 codes + fp16 scales and zeros against fp32 weights
    assert all(eng.plan.module(f"layers.{i}").bytes == packed for i in range(eng.cfg.num_hidden_layers))
    assert "awq int4 g32" in eng.plan.table()
    low = min_budget(eng.cfg, torch.float32, max_context=64, prefill_chunk=2048, quant=eng.quant)
    s = make_engine(d, vram_budget=low)
    assert s.plan.streamed_bytes_per_step >= eng.cfg.num_hidden_layers * packed
    assert s.plan.slot_bytes >= packed and s.weights.stream.slot_bytes == s.plan.slot_bytes
    s.close()
    eng.close()


@pytest.mark.parametrize("quantize,group", [("int4", 32), ("int8", 32), ("int8", -1)])
def test_quantize_at_load(tmp_path, tokenizer_dir, quantize: str, group: int) -> None:
    ref, d = make_hf_model("qwen3", tmp_path, tokenizer_dir=tokenizer_dir, seed=11)
    eng = make_engine(d, max_context=32, quantize=quantize, quant_group=group)
    assert eng.quant.spec.label.startswith(f"rtn {quantize} {'per-channel' if group == -1 else f'g{group}'}")
    sd = ref.state_dict()
    with torch.no_grad():
        for name, w in sd.items():
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                w.copy_(dequantize(quantize_rtn(w, 8 if quantize == "int8" else 4, group)))
    _check_logits(eng, ref, TOL, seed=3)
    eng.close()


def test_triton_kernels_on_quantized_layers(qmodel) -> None:
    from engine.ops_triton import TritonOps

    ref, d = qmodel("qwen3", "gptq-actorder")
    eng = make_engine(d, max_context=32)
    eng.model.ops = TritonOps()
    _check_logits(eng, ref, TRITON_TOL, seed=9)
    eng.close()


def _batch_one_decode_errors(d, ref, variant: int, monkeypatch) -> tuple[list[float], set[int], list[str]]:
    """A bf16 Triton engine's batch-1 decode logits (3 steps after a 9-token prefill) with every packed
    projection of the steps forced to qgemv ``variant``: their errors against ``ref`` (rel_max_err), the
    variants the steps' launches took and the fused int8-x launches (kernels.qgemv_i8.swiglu_qgemv, kernels.
    add_rmsnorm_i8.add_rmsnorm_qgemv) that ran, by name."""
    from engine.ops_triton import TritonOps
    from kernels import add_rmsnorm_i8, qgemv, qgemv_i8

    fused: list[str] = []  # which fused int8-x launches ran
    for mod, name in ((qgemv_i8, "swiglu_qgemv"), (add_rmsnorm_i8, "add_rmsnorm_qgemv")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: (
            lambda o: (o is not None and fused.append(_n)) or o)(_r(*a, **k)))

    forced = qgemv.config(16, 64, variant=variant)
    monkeypatch.setattr(qgemv, "_candidates",
                        lambda block_m, *a, **k: [forced if block_m == 1 else qgemv.config(16, 64)])
    monkeypatch.setattr(qgemv, "_TUNED", {})
    picked, real_launch = [], qgemv._launch
    monkeypatch.setattr(qgemv, "_launch", lambda cfg, *a, **k: (picked.append(cfg.kwargs["VARIANT"]),
                                                                 real_launch(cfg, *a, **k))[1])
    eng = make_engine(d, max_context=32, dtype="bf16")
    eng.model.ops = TritonOps()
    ids = torch.randint(0, eng.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        want = ref(ids).logits.float()
    cache = KVCache(eng.cfg, 1, 32, torch.bfloat16, "cpu")
    forward_prefill(eng.model, cache, ids[:, :9], last_only=True)
    picked.clear()
    errs = [rel_max_err(forward_decode(eng.model, cache, ids[:, t], t), want[:, t]) for t in range(9, 12)]
    eng.close()
    return errs, set(picked), fused


def test_int8_x_gemv_in_batch_one_decode(qmodel, monkeypatch) -> None:
    """Batch-1 decode steps through kernels/qgemv_i8.py (the tuner's variant 4, x rounded to int8; forced here)
    against transformers on the dequantized weights, beside the same bf16 engine through variant 1."""
    ref, d = qmodel("qwen2", "awq")
    errs_i8, picked, fused = _batch_one_decode_errors(d, ref, 4, monkeypatch)
    assert picked == {4}  # every packed projection of the decode steps took variant 4
    # every down projection of the 3 steps (3 layers, one shape) took the SwiGLU in x's rounding but the first,
    # which ran swiglu and then qgemv (that call tuned the shape); likewise gate_up after its norm, and qkv after
    # the norms of layers 1 and 2 (layer 0's input norm has no residual to add: no fused path)
    assert fused.count("swiglu_qgemv") == 3 * LAYERS - 1
    assert fused.count("add_rmsnorm_qgemv") == (3 * LAYERS - 1) + 3 * (LAYERS - 1)
    errs_3d, picked, fused = _batch_one_decode_errors(d, ref, 1, monkeypatch)
    assert picked == {1} and not fused
    # measured: int8 x 2.7 / 3.6 / 7.7%, bf16 x 2.3 / 2.8 / 4.0% (x's int8 rounding per 32 columns is about 2.5x
    # bf16's; a wrong zero point or scale would be tens of percent)
    assert max(errs_i8) <= 2.5 * max(errs_3d), (errs_i8, errs_3d)


@pytest.mark.slow
def test_triton_dense_prefill_on_quantized_layers(qmodel, monkeypatch) -> None:
    """A prefill of 2 x 130 rows (kernels.qlinear.DENSE_MIN_M and more: the act-order weights widened
    into dense tiles through the dense GEMM), then a decode step (the GEMV), against transformers."""
    from engine.ops_triton import TritonOps
    from kernels import qlinear as qlinear_mod
    from kernels.qlinear import DENSE_MIN_M

    dense_rows = []
    real = qlinear_mod.dense_qlinear
    monkeypatch.setattr(qlinear_mod, "dense_qlinear", lambda x, *a, **k: dense_rows.append(x.shape[0]) or real(x, *a, **k))

    ref, d = qmodel("qwen3", "gptq-actorder")
    eng = make_engine(d, max_context=160)
    eng.model.ops = TritonOps()
    ids = torch.randint(0, eng.cfg.vocab_size, (2, 134), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want = ref(ids).logits.float()
    cache = KVCache(eng.cfg, 2, 160, torch.float32, "cpu")
    assert 2 * 130 >= DENSE_MIN_M
    assert rel_max_err(forward_prefill(eng.model, cache, ids[:, :130], last_only=False), want[:, :130]) <= TRITON_TOL
    assert dense_rows and set(dense_rows) == {260}  # every packed projection of the prefill took the dense path
    assert rel_max_err(forward_decode(eng.model, cache, ids[:, 130], 130), want[:, 130]) <= TRITON_TOL  # the GEMV
    assert set(dense_rows) == {260}
    eng.close()


def _rewrite_config(d, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_bad_quantized_checkpoints(qmodel, tmp_path, tokenizer_dir) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    _, d = qmodel("llama", "awq")
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    _rewrite_config(bad, quant_method="bitsandbytes")
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        make_engine(bad)
    _rewrite_config(bad, quant_method="awq", bits=3)
    with pytest.raises(ValueError, match="awq with bits=3 is not supported"):
        make_engine(bad)
    _rewrite_config(bad, bits=4)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.qzeros"]
    sd["model.layers.0.self_attn.o_proj.scales"] = sd["model.layers.0.self_attn.o_proj.scales"][:1].clone()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        make_engine(bad)
    assert "missing tensors: model.layers.1.mlp.down_proj.qzeros" in str(e.value)
    assert "model.layers.0.self_attn.o_proj.scales: expected float16 or bfloat16 [2, 64], got float16 [1, 64]" \
        in str(e.value)
    with pytest.raises(ValueError, match="already quantized"):
        make_engine(d, quantize="int4")
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.qweight"] = sd.pop("lm_head.weight")[:, :8].to(torch.int32).contiguous()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.qweight: a quantized lm_head is not supported"):
        make_engine(bad)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_decode_graph_pieces_of_streamed_quantized_layers(qmodel, fmt: str) -> None:
    """The decode graph's per-slot pieces (replayed as Python on the CPU) find a streamed packed layer's
    slot by where its qweight lives, and equal eager decode steps (its capture failed on every streamed
    quantized layer once: ``QuantWeight`` has no data pointer of its own, so those steps ran eagerly)."""
    from engine.graphs import slot_address
    from tests.helpers import CpuDecodeGraph, i32

    _, d = qmodel("qwen2", fmt)
    probe = make_engine(d)
    low = min_budget(probe.cfg, torch.float32, max_context=64, prefill_chunk=2048, quant=probe.quant)
    probe.close()
    runs = []
    for use_graph in (False, True):
        s = make_engine(d, vram_budget=low, host_budget=1 << 30)
        assert s.plan.streamed_layers and not s.plan.resident_layers
        cache = KVCache(s.cfg, 1, 64, torch.float32, "cpu")
        graph = CpuDecodeGraph(s.model, cache, 1) if use_graph else None
        ids = torch.randint(0, s.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
        logits, out = forward_prefill(s.model, cache, ids, last_only=True), []
        for pos in range(5, 9):
            tok = logits.argmax(-1)
            logits = forward_decode(s.model, cache, tok, pos) if graph is None else graph(tok, i32([pos])).clone()
            out.append(logits)
        if graph is not None:
            pieces = [per_slot for k, (_, per_slot) in ((k, w) for k, w in graph.steps if k == "streamed")]
            assert len(pieces) == len(s.plan.streamed_layers)
            assert all(set(p) == {slot_address(s.weights.slot_layer(j, 0)["self_attn.qkv_proj.weight"])
                                  for j in range(len(s.weights.stream.slots))} for p in pieces)
        runs.append(torch.stack(out))
        s.close()
    assert rel_max_err(runs[1], runs[0]) < 1e-5
