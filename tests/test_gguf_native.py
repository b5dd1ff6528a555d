"""GGUF K-quant layers held as the file's own blocks (``engine.quant.ggml``): bytes, views and tokens.

The tiny GGUF files of ``tests/test_gguf_tiny.py`` (rows of 256). A Q4_K_M (Q5_K_M) file's layers mix Q4_K
(Q5_K) and Q6_K (llama.cpp gives some layers' attn_v / ffn_down more bits), so its layers have two signatures;
each layer is planned and streamed at its own size, the blocks in VRAM are the file's bytes, and
the tokens equal transformers reading the same file, resident and streamed (pinned and disk tiers).
``LAYERSTREAM_GGUF_NATIVE=0`` brings back the canonical repacking (same tokens, more bytes).
"""

from __future__ import annotations

import pytest
import torch

from engine.footprint import min_budget
from engine.generate import generate
from engine.quant.ggml import MODULES, GGMLWeight, NativeLayouts
from engine.quant.layout import QuantLayerLayout
from engine.sampling import SamplingParams
from engine.weights import UnitBuilder
from memory.process_vram import outside_allocator
from tests.helpers import hf_greedy, make_engine, random_prompts
from tests.test_gguf_tiny import gguf_model  # noqa: F401 (the fixture)


def _block_bytes(views: dict) -> int:
    return sum(w.nbytes for w in views.values() if isinstance(w, GGMLWeight))


@pytest.mark.parametrize("case,base", [(("llama", "Q4_K_M"), "q4_k"), (("qwen3", "Q5_K_M"), "q5_k")],
                         ids=["Q4_K_M", "Q5_K_M"])
def test_k_m_layers_hold_the_files_blocks(gguf_model, case, base):  # noqa: F811
    _, path = gguf_model(*case)
    engine = make_engine(path, max_context=32)
    layouts, ckpt, cfg = engine.weights.layout, engine.ckpt, engine.cfg
    assert isinstance(layouts, NativeLayouts) and engine.quant.label == f"gguf {base.upper()}/Q6_K blocks (native)"
    signatures = engine.quant.native
    assert len(set(signatures)) == 2 and all(set(s) == {base, "q6_k"} or set(s) == {base} for s in signatures)
    assert engine.plan.layer_bytes == layouts.nbytes == max(layouts.layer_bytes) > min(layouts.layer_bytes)
    note = next(n for n in engine.plan.notes if n.startswith("GGUF: "))
    assert f"layers packed as {engine.quant.label}" in note and "output Q6_K held as its blocks" in note
    head = engine.weights.lm_head  # the untied Q6_K output: blocks too, 6.56 bits per weight
    assert engine.quant.native_head == "q6_k" and isinstance(head, GGMLWeight)
    assert engine.plan.module("lm_head").bytes == head.nbytes == ckpt.raw["lm_head.weight"].nbytes
    assert torch.equal(head.dequantize(), ckpt.tensor("lm_head.weight"))
    for i in range(cfg.num_hidden_layers):
        assert engine.plan.module(f"layers.{i}").bytes == layouts.of(i).nbytes
        views = engine.weights.layer(i)
        file_bytes = sum(ckpt.raw[f"model.layers.{i}.{m}.weight"].nbytes for m in MODULES)
        assert _block_bytes(views) == file_bytes  # the file's bits per weight, nothing added
        qkv, up = views["self_attn.qkv_proj.weight"], views["mlp.gate_up_proj.weight"]
        assert [t for t, _ in qkv.parts] == ([base] if signatures[i][2] == base else [base, "q6_k"])
        widened = torch.cat([ckpt.tensor(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkv"])
        assert torch.equal(qkv.dequantize(), widened)  # llama's Q/K rows back in the HF order
        down = ckpt.tensor(f"model.layers.{i}.mlp.down_proj.weight")
        assert torch.equal(views["mlp.down_proj.weight"].dequantize(), down)
        assert torch.equal(up.dequantize()[cfg.intermediate_size:], ckpt.tensor(f"model.layers.{i}.mlp.up_proj.weight"))
        engine.weights.release(i)
    engine.close()


def test_native_layers_are_smaller_than_repacked_and_give_the_same_tokens(gguf_model, monkeypatch):  # noqa: F811
    _, path = gguf_model("llama", "Q4_K_M")
    native = make_engine(path, max_context=32)
    monkeypatch.setenv("LAYERSTREAM_GGUF_NATIVE", "0")
    repacked = make_engine(path, max_context=32)
    assert isinstance(repacked.weights.layout, QuantLayerLayout) and not repacked.quant.native
    assert sum(native.weights.layout.layer_bytes) < 0.75 * repacked.cfg.num_hidden_layers * repacked.plan.layer_bytes
    prompt = random_prompts([6], native.cfg.vocab_size, seed=31)[0]
    got = [generate(e, [prompt], SamplingParams(), max_new_tokens=8).token_ids[0] for e in (native, repacked)]
    assert got[0] == got[1]
    native.close()
    repacked.close()


@pytest.mark.parametrize("tier", ["pinned", "disk"])
def test_streamed_native_layers_give_transformers_tokens(gguf_model, tier):  # noqa: F811
    ref, path = gguf_model("llama", "Q4_K_M")
    probe = make_engine(path, max_context=32)
    low = min_budget(probe.cfg, torch.float32, max_context=32, prefill_chunk=2048, quant=probe.quant)
    probe.close()
    engine = make_engine(path, max_context=32, vram_budget=low, host_budget=(1 << 30) if tier == "pinned" else 0)
    plan = engine.plan
    assert len(plan.streamed_layers) >= 2 and (tier == "pinned" or plan.disk_layers)
    sizes = {u.name: u.nbytes for u in engine.weights.units}
    assert all(sizes[f"layer.{i}"] == engine.weights.layout.of(i).nbytes for i in plan.streamed_layers)
    assert not plan.lm_head_resident and plan.lm_head_chunks >= 1  # the Q6_K output streams as block rows
    head_rows = [n for n in sizes if n.startswith("lm_head.")]
    assert sum(sizes[n] for n in head_rows) == engine.ckpt.raw["lm_head.weight"].nbytes
    head_row = engine.ckpt.raw["lm_head.weight"].nbytes // engine.cfg.vocab_size  # block-row bytes, not widened
    assert len(head_rows) == -(-engine.cfg.vocab_size // (plan.slot_bytes // head_row))  # each chunk fills a slot
    w = engine.weights  # in more chunks: consecutive block rows of the file, covering it once
    spans = [u.spans[0] for u in UnitBuilder(engine.ckpt, engine.cfg, w.layout, head_blocks=w.head_blocks)
             .lm_head_chunks(3, "pinned")]
    assert [sp.offset - spans[0].offset for sp in spans] == [0, spans[0].nbytes, 2 * spans[0].nbytes]
    assert sum(sp.nbytes for sp in spans) == engine.ckpt.raw["lm_head.weight"].nbytes
    prompt = random_prompts([5], engine.cfg.vocab_size, seed=32)[0]
    assert generate(engine, [prompt], SamplingParams(), max_new_tokens=10).token_ids[0] == hf_greedy(ref, prompt, 10)
    engine.close()


@pytest.mark.parametrize("file_type,fallbacks", [("Q4_K_M", {"q5_0", "q8_0"}), ("Q5_K_M", {"q5_1", "q8_0"})])
def test_k_quants_mixed_with_fallback_types_stay_native(gguf_model, file_type, fallbacks):  # noqa: F811
    """Rows of 288 (not a multiple of 256, as Qwen2.5-72B's 29568): llama.cpp writes those ffn_down
    tensors in its block-32 fallbacks (Q5_0 / Q5_1 for the K-quant, Q8_0 for Q6_K).  The layers mix
    K-quants and fallbacks, all held as the file's blocks, and give transformers' greedy tokens."""
    ref, path = gguf_model("llama", file_type, intermediate=288)
    engine = make_engine(path, max_context=32)
    assert engine.cfg.intermediate_size == 288 and isinstance(engine.weights.layout, NativeLayouts)
    downs = {s[MODULES.index("mlp.down_proj")] for s in engine.quant.native}
    assert downs == fallbacks and {t for s in engine.quant.native for t in s} >= {"q6_k", file_type[:2].lower() + "_k"}
    views = engine.weights.layer(0)
    down = views["mlp.down_proj.weight"]
    assert isinstance(down, GGMLWeight) and down.in_features == 288
    assert torch.equal(down.dequantize(), engine.ckpt.tensor("model.layers.0.mlp.down_proj.weight"))
    assert _block_bytes(views) == sum(engine.ckpt.raw[f"model.layers.0.{m}.weight"].nbytes for m in MODULES)
    engine.weights.release(0)
    prompt = random_prompts([5], engine.cfg.vocab_size, seed=33)[0]
    assert generate(engine, [prompt], SamplingParams(), max_new_tokens=10).token_ids[0] == hf_greedy(ref, prompt, 10)
    engine.close()


@pytest.mark.parametrize("case,native", [(("qwen2-tied", "Q6_K"), "q6_k"), (("qwen3", "Q5_K_M"), "q5_k"),
                                         (("llama", "Q4_0"), "q4_0"), (("qwen2", "Q8_0"), "q8_0"),
                                         (("qwen2", "Q5_1"), "q5_1"), (("llama", "Q5_0"), "q5_0"),
                                         (("qwen3", "Q4_1"), "q4_1"), (("llama", "BF16"), None)],
                         ids=["Q6_K", "Q5_K_M", "Q4_0", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "BF16"])
def test_only_types_the_kernels_decode_stay_native(gguf_model, case, native):  # noqa: F811
    """Every quantized type the kernels decode (K-quants and the block-32 ones) keeps its blocks; float
    layers (BF16) stay dense."""
    _, path = gguf_model(*case)
    engine = make_engine(path, max_context=32)
    if native is None:
        assert engine.quant is None
    else:
        assert native in {t for s in engine.quant.native for t in s}
    assert isinstance(engine.weights.layout, NativeLayouts) == (native is not None)
    engine.close()


def test_quantize_is_refused_on_a_native_gguf(gguf_model):  # noqa: F811
    _, path = gguf_model("llama", "Q4_K_M")
    with pytest.raises(ValueError, match="already quantized .*native.*drop --quantize"):
        make_engine(path, max_context=32, quantize="int8")


@pytest.mark.parametrize("rows,tile", [(3, 256), (80, 256), (80, 200), (256, 200), (256, 512)],
                         ids=["gemv", "dequant-tiles", "uneven", "kept-tile", "kept-one-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ops_on_a_fused_weight_of_mixed_parts(rows, tile, dtype, monkeypatch):
    """TritonOps.linear on a qkv-like weight of three parts (q4_k, q5_k, then q6_k rows) with a bias: a
    GEMV per part into its columns, or (80 rows) dense tiles that each straddle a boundary: 2 of 256
    rows, or with room for 200 rows 3 equal tiles of 176 (the last one ending at row 512, over 16 rows of the second's).
    From the dense path's 256 rows, the tiles (or the one whole weight) live in the buffer TritonOps keeps."""
    from engine import ops_triton as ops_mod
    from engine.gguf import random_blocks as rb
    from gguf import GGMLQuantizationType as QT
    from kernels.ggml_blocks import row_bytes
    from tests.kernel_utils import DEV, rel_err

    k, gen = 512, torch.Generator(device=DEV).manual_seed(3)
    parts = tuple((t, rb.random_blocks(q, n * k // 256, 0.02, gen).view(n, row_bytes(t, k)))
                  for t, q, n in (("q4_k", QT.Q4_K, 192), ("q5_k", QT.Q5_K, 192), ("q6_k", QT.Q6_K, 128)))
    w = GGMLWeight(parts, k)
    x = torch.randn((rows, k), generator=gen, device=DEV).to(dtype)
    b = torch.randn(512, generator=gen, device=DEV).to(dtype)
    monkeypatch.setenv("LAYERSTREAM_DEQUANT_SCRATCH", str(tile * k * dtype.itemsize))  # read by TritonOps()
    ops = ops_mod.TritonOps()
    shapes = []
    gemm = ops._k["linear"]
    ops._k["linear"] = lambda x, w, b=None, out=None: shapes.append(tuple(w.shape)) or gemm(x, w, b, out=out)
    got = ops.linear(x, w, b)
    assert shapes == ([] if rows == 3 else [(512, k)] if tile == 512 else [(256, k)] * 2 if tile == 256
                      else [(176, k)] * 3)
    kept = ops._tile
    assert (kept is None) == (rows < 256) and (kept is None or kept.numel() == tile * k * dtype.itemsize)
    want = x.float() @ w.dequantize().T + b.float()
    assert got.shape == (rows, 512) and got.dtype == dtype
    assert rel_err(got.float(), want) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_host_layers_of_native_blocks_are_widened_once(gguf_model, monkeypatch):  # noqa: F811
    """--host-compute N on a GGUF held as its blocks: the host layers' blocks are widened once to the
    lane's dtype (engine.host_forms), transformers' greedy tokens; refused when too little RAM is
    available to widen every layer."""
    import engine.host_forms as forms

    ref, path = gguf_model("llama", "Q4_K_M")
    resident = make_engine(path, max_context=32)
    low = min_budget(resident.cfg, torch.float32, max_context=32, prefill_chunk=4, quant=resident.quant)
    engine = make_engine(path, max_context=32, prefill_chunk=4, vram_budget=low, host_compute=2)
    lane = engine.model.host
    assert lane.weight_form == "widened" and "widened to torch.float32" in lane.describe()
    assert all(type(v) is torch.Tensor for i in lane.layers for v in lane.views[i].values())
    prompt = random_prompts([6], resident.cfg.vocab_size, seed=23)[0]
    assert generate(engine, [prompt], SamplingParams(), max_new_tokens=5).token_ids[0] == hf_greedy(ref, prompt, 5)
    assert lane.steps == 4
    for e in (resident, engine):
        e.close()
    monkeypatch.setattr(forms.psutil, "virtual_memory", lambda: type("VM", (), {"available": 1 << 20})())
    with pytest.raises(ValueError, match="--host-compute 2: .*no kernel.*too little RAM.*LAYERSTREAM_GGUF_NATIVE=0"):
        make_engine(path, max_context=32, host_compute=2)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", ["low", "full"])
def test_gpu_native_layers_in_decode_graphs_give_transformers_tokens(gguf_model, budget):  # noqa: F811
    """On a GPU with the Triton kernels and CUDA graphs: layers of both signatures streamed through the
    same staging slots (each layer's graph reads its own layout's views) and the Q6_K output in block-row
    chunks, or everything resident; fp32 compute, greedy tokens equal transformers'."""
    ref, path = gguf_model("llama", "Q4_K_M")
    opts = dict(device="cuda", kernels="triton", max_context=64)
    if budget == "low":
        probe = make_engine(path, **opts)
        low = min_budget(probe.cfg, torch.float32, max_context=64, prefill_chunk=2048, quant=probe.quant)
        # the budget is the process's (memory.process_vram): the allocator's share plus what is held outside it
        outside = outside_allocator(torch.device("cuda")).bytes
        opts["vram_budget"] = low + outside + probe.plan.layer_bytes // 2  # no layer resident
        probe.close()
    engine = make_engine(path, **opts)
    plan = engine.plan
    assert engine.graph is not None and bool(plan.streamed_layers) == (budget == "low")
    if budget == "low":
        assert len({engine.quant.native[i] for i in plan.streamed_layers}) == 2 and not plan.lm_head_resident
    prompt = random_prompts([7], engine.cfg.vocab_size, seed=33)[0]
    assert generate(engine, [prompt], SamplingParams(), max_new_tokens=12).token_ids[0] == hf_greedy(ref, prompt, 12)
    engine.close()

