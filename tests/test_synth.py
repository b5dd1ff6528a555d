"""Tests for synthetic checkpoints (engine.synth: presets, tokenizer, writer) and the tools.synth CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from engine.synth import writer as synth
from engine.synth.presets import ALIASES, PRESETS, is_tiny, resolve_preset
from engine.synth.tokenizer import build_tokenizer
from engine.synth.writer import build_config, plan_shards, synthesize, tensor_specs
from tools.synth import main

TINY = ["tiny-qwen2", "tiny-qwen2-tied", "tiny-qwen3", "tiny-llama", "tiny-mistral", "default"]
TEXT = "Hello, wörld! Ünïcödé ✓ 😀👍🏽 你好，世界 こんにちは\n\ttabs  and   spaces 12345"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthesized checkpoint per tiny preset."""
    root = tmp_path_factory.mktemp("synth")
    return {p: synthesize(p, root / p) for p in TINY}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_loads_in_transformers(tiny_dirs: dict[str, Path], preset: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_dirs[preset]
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == PRESETS[preset]["architectures"][0]
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    cfg = json.loads((d / "config.json").read_text())
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    assert torch.isfinite(logits).all()
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] >= len(tok)
    eos = cfg["eos_token_id"]
    assert all(i < cfg["vocab_size"] for i in (eos if isinstance(eos, list) else [eos]))


def test_tied_and_untied_heads(tiny_dirs: dict[str, Path]) -> None:
    def names(p: str) -> set[str]:
        with safe_open(tiny_dirs[p] / "model.safetensors", "pt") as f:
            return set(f.keys())

    assert "lm_head.weight" in names("tiny-qwen2") and "lm_head.weight" not in names("tiny-qwen2-tied")
    assert "model.layers.0.self_attn.q_proj.bias" in names("tiny-qwen2")
    assert "model.layers.0.self_attn.o_proj.bias" not in names("tiny-qwen2")
    qwen3 = names("tiny-qwen3")
    assert {"model.layers.2.self_attn.q_norm.weight", "model.layers.2.self_attn.k_norm.weight"} <= qwen3
    assert not any(n.endswith(".bias") for n in qwen3 | names("tiny-llama") | names("tiny-mistral"))
    with safe_open(tiny_dirs["tiny-qwen3"] / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [128, 64]
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight").get_shape() == [64, 128]
        assert f.get_slice("model.layers.0.self_attn.k_norm.weight").get_shape() == [32]


CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
EXPECTED_CHAT = {
    "tiny-qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                  "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "tiny-qwen3": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "tiny-llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                  "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
                  "\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "tiny-mistral": "<s>[INST] What is 2+2? [/INST]4</s>",
}


@pytest.mark.parametrize("preset", list(EXPECTED_CHAT))
def test_chat_template(tiny_dirs: dict[str, Path], preset: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[preset])
    assert tok.apply_chat_template(CHAT, tokenize=False) == EXPECTED_CHAT[preset]
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    suffix = {"tiny-llama": "<|start_header_id|>assistant<|end_header_id|>\n\n", "tiny-mistral": " [/INST]"}
    assert prompt.endswith(suffix.get(preset, "<|im_start|>assistant\n"))


def test_chat_template_system_and_thinking(tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    qwen2 = AutoTokenizer.from_pretrained(tiny_dirs["tiny-qwen2"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert qwen2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    qwen3 = AutoTokenizer.from_pretrained(tiny_dirs["tiny-qwen3"])
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nb"},
            {"role": "user", "content": "c"}]
    text = qwen3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc"
                    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3", "tiny-llama", "tiny-mistral"])
def test_tokenizer_round_trip(tiny_dirs: dict[str, Path], preset: str) -> None:
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny_dirs[preset] / "tokenizer.json"))
    enc = raw.encode(TEXT, add_special_tokens=False)
    assert raw.decode(enc.ids, skip_special_tokens=False) == TEXT
    hf = AutoTokenizer.from_pretrained(tiny_dirs[preset])
    ids = hf(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == enc.ids and hf.decode(ids) == TEXT
    assert 1000 <= raw.get_vocab_size(with_added_tokens=False) <= 2500


@pytest.mark.parametrize(("family", "checks", "bos"), [
    ("qwen2.5", {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|file_sep|>": 151664}, None),
    ("qwen3", {"<|im_end|>": 151645, "<think>": 151667, "</think>": 151668}, None),
    ("llama3.1", {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                  "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
                  "<|reserved_special_token_247|>": 128255}, 128000),
])
def test_real_special_token_ids(tmp_path: Path, family: str, checks: dict[str, int], bos: int | None) -> None:
    from transformers import AutoTokenizer

    build_tokenizer(family).write(tmp_path)
    assert (tmp_path / "tokenizer.json").stat().st_size < 10_000_000
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for content, real_id in checks.items():
        assert raw.token_to_id(content) == real_id and raw.id_to_token(real_id) == content
        assert hf.convert_tokens_to_ids(content) == real_id
    special = next(iter(checks))
    ids = hf(f"{special}hi 😀{special}")["input_ids"]
    assert ids[0] == (bos if bos is not None else checks[special]) and ids[-1] == checks[special]
    assert (ids[1] == checks[special]) == (bos is not None)
    assert hf.decode(ids, skip_special_tokens=True) == "hi 😀"


def test_qwen25_7b_tensor_list_matches_published_size() -> None:
    cfg = build_config("qwen2.5-7b")
    specs = tensor_specs(cfg, "bf16")
    assert sum(s.numel for s in specs) == 7_615_616_512
    assert sum(s.nbytes for s in specs) == 15_231_233_024
    shapes = {s.name: s.shape for s in specs}
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (152064, 3584)
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["model.layers.0.self_attn.v_proj.bias"] == (512,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (3584, 18944)
    assert len(specs) == 1 + 28 * 12 + 2
    assert len(plan_shards(specs, synth.DEFAULT_MAX_SHARD_BYTES)) == 4
    assert sum(s.numel for s in tensor_specs(build_config("llama-3.1-8b"))) == 8_030_261_248
    assert sum(s.numel for s in tensor_specs(build_config("qwen2.5-7b", "fp32", layers=2))) == (
        2 * 152064 * 3584 + 3584 + 2 * 233_057_792)


def test_preset_configs() -> None:
    cfg = build_config("qwen2.5-7b", "fp16", layers=2)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (3584, 18944, 28, 4, 152064, 1e6, 1e-6)
    assert cfg["num_hidden_layers"] == 2 and cfg["torch_dtype"] == "float16"
    assert PRESETS["qwen2.5-7b"]["num_hidden_layers"] == 28
    for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"):
        assert PRESETS[name]["tie_word_embeddings"] is True
    assert PRESETS["llama-3.1-70b"]["rope_scaling"]["rope_type"] == "llama3"
    assert set(ALIASES) == {p for p in PRESETS if not is_tiny(p)}
    assert ALIASES["qwen2.5-7b"] == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_preset("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b" and resolve_preset("nope") is None


def test_sharded_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = synthesize("tiny-qwen3", tmp_path / "ckpt", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            for key in f.keys():
                seen[key] = shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    assert set(seen) == {s.name for s in tensor_specs(json.loads((out / "config.json").read_text()))}
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_determinism(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    again = synthesize("tiny-qwen2", tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(tiny_dirs["tiny-qwen2"] / name)
    other = synthesize("tiny-qwen2", tmp_path / "seed1", seed=1)
    assert _sha(other / "model.safetensors") != _sha(again / "model.safetensors")
    two = synthesize("tiny-qwen2", tmp_path / "two", layers=2, dtype="fp32")
    assert json.loads((two / "config.json").read_text())["num_hidden_layers"] == 2
    with safe_open(again / "model.safetensors", "pt") as a, safe_open(two / "model.safetensors", "pt") as b:
        assert "model.layers.2.mlp.up_proj.weight" not in b.keys()
        for key in b.keys():  # layers differ in count only; fp32 rounds to the same bf16 values
            assert torch.equal(a.get_tensor(key), b.get_tensor(key).to(torch.bfloat16)), key
        norm = a.get_tensor("model.layers.0.input_layernorm.weight").float()
        assert abs(norm.mean().item() - 1.0) < 0.02 and a.get_tensor("model.embed_tokens.weight").float().std() < 0.03


def test_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--preset", "tiny-qwen2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    # --force replaces a model directory only: a mistyped --out (here a folder of the user's) is never deleted
    assert main(["--preset", "tiny-qwen2", "--out", str(out), "--force"]) == 2
    assert "holds no model" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["--preset", "tiny-qwen2", "--out", str(out / "keep.txt"), "--force", "--format", "gguf"]) == 2
    assert "is a file" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")  # an earlier synthesis, say
    assert main(["--preset", "tiny-qwen2", "--out", str(out), "--force"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_gguf_type_needs_the_gguf_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "tiny-qwen2", "--out", str(tmp_path / "x"), "--gguf-type", "Q8_0"]) == 2
    assert "--gguf-type applies to --format gguf" in capsys.readouterr().err  # before: ignored, safetensors written
    assert not (tmp_path / "x").exists()


def test_unknown_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "gpt-5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "gpt-5" in err and "qwen2.5-7b" in err and "tiny-llama" in err
    assert not (tmp_path / "x").exists()


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(spec: synth.TensorSpec, seed: int, device: str = "cpu") -> torch.Tensor:
        if "layers.1." in spec.name:
            raise RuntimeError("disk full")
        return torch.zeros(spec.shape, dtype=torch.bfloat16)

    monkeypatch.setattr(synth, "make_tensor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synthesize("tiny-qwen2", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _decode_each(raw: Tokenizer, n: int) -> list[str]:
    return raw.decode_batch([[i] for i in range(n)], skip_special_tokens=False)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_tokenizer_covers_the_whole_vocab(tiny_dirs: dict[str, Path], preset: str) -> None:
    """Every id below config.vocab_size has a token and decodes to non-empty text."""
    cfg = json.loads((tiny_dirs[preset] / "config.json").read_text())
    raw = Tokenizer.from_file(str(tiny_dirs[preset] / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == cfg["vocab_size"]
    assert all(_decode_each(raw, cfg["vocab_size"]))


@pytest.mark.parametrize(("family", "vocab_size", "specials"), [
    ("qwen2.5", 152064, {"<|endoftext|>": 151643, "<|im_end|>": 151645}),
    ("llama3.1", 128256, {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009}),
])
def test_real_size_tokenizer_fill(tmp_path: Path, family: str, vocab_size: int, specials: dict[str, int]) -> None:
    """The gap between the trained tokens and the special ids is filled with pseudo-words: every id decodes to
    visible text, the special tokens keep their real ids, encoding is unchanged, transformers still loads it."""
    from transformers import AutoTokenizer

    plain = build_tokenizer(family)
    plain.write(tmp_path)
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    tok = build_tokenizer(family)
    tok.fill(vocab_size)
    tok.write(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == vocab_size == tok.size
    texts = _decode_each(raw, vocab_size)
    trained = tok.extra["trained_vocab"]
    assert all(texts) and all(any(c.isalpha() for c in t) for t in texts[trained:min(specials.values())])
    assert len(set(texts[trained:min(specials.values())])) == min(specials.values()) - trained
    for content, real_id in specials.items():
        assert raw.token_to_id(content) == real_id and texts[real_id] == content
    assert raw.encode(TEXT, add_special_tokens=False).ids == ref
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == ref and len(hf) == vocab_size
    assert (tmp_path / "tokenizer.json").stat().st_size < 10_000_000


@pytest.mark.slow
def test_random_weights_print_visible_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A one-layer Qwen2.5-0.5B synth (real 151,936-token vocab): the CLI prints visible gibberish, not nothing."""
    from engine.run import main as run_main

    d = synthesize("qwen2.5-0.5b", tmp_path / "q05", layers=1)
    rc = run_main(["--model", str(d), "--device", "cpu", "--prompt", "Hello", "--max-new-tokens", "12",
                   "--max-context", "256", "--prefill-chunk", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["token_ids"]
    assert sum(c.isalpha() for c in out["text"]) >= len(out["token_ids"]), out["text"]
