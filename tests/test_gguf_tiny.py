"""Tiny random models written as GGUF (``engine.gguf.writer``), run by the engine and by transformers.

Each case builds a small transformers model (rows of 256, so the K-quant block formats apply),
writes it as a GGUF of one file type (mixed per-tensor types for the ``_K_M`` ones, as llama.cpp
lays them out), and loads the same file into transformers (its own GGUF reader and dequantizer)
and into our engine. Checked: the config and tensor types read back, prefill and decode logits
(fp32, relative to max |ref|), greedy tokens, a split GGUF set equal to the single file, and the
disk tier's ``read_into`` path (row ranges of quantized tensors) equal to ``tensor()``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from tests.helpers import (_randomise, forward_decode, forward_prefill, hf_greedy, make_engine, random_prompts,
                           rel_max_err)

TOL = 1e-4
# (family, file type): every block format the engine reads appears in at least one case
CASES = [("llama", "Q4_K_M"), ("llama", "Q4_0"), ("qwen2", "Q8_0"), ("qwen2", "Q5_1"), ("qwen3", "Q5_K_M"),
         ("qwen2-tied", "Q6_K"), ("llama", "Q5_0"), ("qwen3", "Q4_1"), ("llama", "BF16"), ("qwen2", "F16")]


def tiny_config(family: str, vocab: int, intermediate: int = 512, layers: int = 3):
    import transformers

    common = dict(hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, initializer_range=0.08,
                  rms_norm_eps=1e-6, tie_word_embeddings=family == "qwen2-tied", bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if family.startswith("qwen2"):
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common, rope_theta=1e6)
    if family == "qwen3":  # transformers' GGUF loader assumes Qwen3's head_dim of 128
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**{**common, "num_attention_heads": 4},
                                                                       head_dim=128, rope_theta=1e6)
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(**common, rope_theta=10000.0)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tokenizer_dir):
    """``get(family, file_type, split=0, intermediate=512, layers=3) -> (transformers model of the GGUF, its path)``
    (an intermediate size that is not a multiple of 256 puts ffn_down in llama.cpp's fallback types)."""
    from transformers import AutoModelForCausalLM

    from engine.gguf.writer import write_gguf
    from tests.helpers import TOKENIZER_FILES, vocab_for

    built = {}

    def get(family: str, file_type: str, split: int = 0, intermediate: int = 512, layers: int = 3):
        key = (family, file_type, split, intermediate, layers)
        if key not in built:
            d = tmp_path_factory.mktemp(f"{family}-hf")
            cls, cfg = tiny_config(family, vocab_for(tokenizer_dir), intermediate, layers)
            torch.manual_seed(CASES.index((family, file_type)) if (family, file_type) in CASES else 0)
            model = cls(cfg).float()
            _randomise(model, seed=1)
            model.save_pretrained(d, safe_serialization=True)
            for name in TOKENIZER_FILES:
                shutil.copy(Path(tokenizer_dir) / name, d / name)
            out = tmp_path_factory.mktemp(f"{family}-{file_type}-gguf") / "model.gguf"
            paths = write_gguf(d, out, file_type, split_max_tensors=split)
            ref = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=paths[0].name, dtype=torch.float32)
            built[key] = ref.eval(), paths[0]
        return built[key]

    return get


@pytest.mark.parametrize("family,file_type", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_logits_and_greedy_match_transformers(gguf_model, family, file_type):
    ref, path = gguf_model(family, file_type)
    engine = make_engine(path, batch=2, max_context=32)
    cfg = engine.cfg
    assert cfg.model_type == family.removesuffix("-tied") and cfg.tie_word_embeddings == (family == "qwen2-tied")
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits.float()
    cache = KVCache(cfg, 2, 32, torch.float32, "cpu")
    got = forward_prefill(engine.model, cache, ids[:, :8], last_only=False)
    assert rel_max_err(got, want[:, :8]) <= TOL, f"prefill: {rel_max_err(got, want[:, :8]):.2e}"
    for t in range(8, 11):
        err = rel_max_err(forward_decode(engine.model, cache, ids[:, t], t), want[:, t])
        assert err <= TOL, f"decode at {t}: {err:.2e}"
    prompt = random_prompts([5], cfg.vocab_size, seed=8)[0]
    assert generate(engine, [prompt], SamplingParams(), max_new_tokens=12).token_ids[0] == hf_greedy(ref, prompt, 12)
    engine.close()


def test_k_quant_file_has_llama_cpp_mix(gguf_model):
    """A Q4_K_M file holds Q4_K, Q6_K (output, some attn_v / ffn_down) and F32 norms, like llama.cpp's."""
    from engine.gguf.reader import open_gguf_files

    _, path = gguf_model("llama", "Q4_K_M")
    files = open_gguf_files(path)
    types = {n: t.qtype.name for n, t in files.tensors.items()}
    # llama.cpp's use_more_bits for 3 layers (integer division): layer 2 only (i >= 7 * 3 // 8)
    assert types["output.weight"] == "Q6_K" and types["blk.2.attn_v.weight"] == "Q6_K"
    assert types["blk.2.ffn_down.weight"] == "Q6_K" and types["blk.2.ffn_up.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == types["blk.1.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "Q4_K"


def test_split_set_equals_single_file(gguf_model):
    _, single = gguf_model("qwen2", "Q8_0")
    _, first = gguf_model("qwen2", "Q8_0", split=10)  # 39 tensors: 4 parts
    assert first.name == "model-00001-of-00004.gguf", first.name
    a, b = make_engine(single), make_engine(first.parent)  # the directory form finds the first part
    prompt = random_prompts([6], a.cfg.vocab_size, seed=2)[0]
    assert {t.file.name for t in b.ckpt.raw.values()} == {f"model-0000{i}-of-00004.gguf" for i in range(1, 5)}
    out = [generate(e, [prompt], SamplingParams(), max_new_tokens=8).token_ids[0] for e in (a, b)]
    assert out[0] == out[1]
    a.close()
    b.close()


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                                  "model.embed_tokens.weight", "model.layers.2.input_layernorm.weight"])
def test_read_into_row_ranges_equal_tensor(gguf_model, name):
    """The disk tier's path (pread of the rows' blocks, widened) gives the bytes of ``tensor()``."""
    from engine.gguf import open_gguf

    _, path = gguf_model("llama", "Q4_K_M")
    _, ckpt, _ = open_gguf(path)
    full = ckpt.tensor(name).contiguous().view(-1).view(torch.uint8)
    row = full.numel() // ckpt.tensors[name].shape[0]
    for start, n in [(0, full.numel()), (row, 3 * row), (row + 8, row), (full.numel() - 4, 4)]:
        out = torch.empty(n, dtype=torch.uint8)
        ckpt.read_into(name, out, start)
        assert torch.equal(out, full[start:start + n]), (name, start, n)
    assert ckpt.raw_span(name) is None
    if len(ckpt.tensors[name].shape) == 2:
        assert torch.equal(ckpt.tensor_rows(name, 2, 7), ckpt.tensor(name)[2:7])
    ckpt.close()


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, tokenizer_dir):
    """Llama 3 rope scaling survives the trip through llama.cpp's rope_freqs divisors: an F32 GGUF of a
    llama3-rope model gives transformers' logits of the original checkpoint (transformers' own GGUF
    loader drops rope_freqs, so the reference is the safetensors model)."""
    from engine.gguf.writer import write_gguf
    from tests.helpers import make_hf_model

    ref, d = make_hf_model("llama3-rope", tmp_path, tokenizer_dir=tokenizer_dir, seed=4)
    path = write_gguf(d, tmp_path / "l3.gguf", "F32")[0]
    engine = make_engine(path, max_context=64)
    want = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    assert engine.cfg.rope_scaling == want
    ids = torch.randint(0, engine.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = forward_prefill(engine.model, KVCache(engine.cfg, 1, 64, torch.float32, "cpu"), ids, last_only=False)
    assert rel_max_err(got, expected) <= TOL
    engine.close()


@pytest.mark.parametrize("native", [False, True], ids=["repacked", "native"])
@pytest.mark.parametrize("plan", ["stream-pinned", "stream-disk"])
def test_half_precision_streaming_equals_resident(gguf_model, plan, native, monkeypatch):
    """In bf16 (the GPU case: widened float32 tensors differ from the compute dtype, so the disk tier
    falls back from read_into to packing through tensor()) streamed layers give the resident logits,
    repacked (``LAYERSTREAM_GGUF_NATIVE=0``) or held as the file's Q8_0 blocks."""
    from engine.footprint import min_budget

    if not native:
        monkeypatch.setenv("LAYERSTREAM_GGUF_NATIVE", "0")
    _, path = gguf_model("qwen2", "Q8_0")
    resident = make_engine(path, dtype="bf16", max_context=32)
    assert bool(resident.quant.native) == native
    low = min_budget(resident.cfg, torch.bfloat16, batch=1, max_context=32, prefill_chunk=2048, quant=resident.quant)
    streamed = make_engine(path, dtype="bf16", max_context=32, vram_budget=low,
                           host_budget=(1 << 30) if plan == "stream-pinned" else 0)
    assert streamed.plan.streamed_layers and (plan == "stream-pinned" or streamed.plan.disk_layers)
    prompt = random_prompts([6], resident.cfg.vocab_size, seed=12)[0]
    outs = [generate(e, [prompt], SamplingParams(), max_new_tokens=8).token_ids[0] for e in (resident, streamed)]
    assert outs[0] == outs[1]
    resident.close()
    streamed.close()
