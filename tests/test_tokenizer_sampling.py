"""CPU tests for engine/tokenizer.py, engine/detok.py and engine/sampling.py (transformers as reference)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from engine.detok import IncrementalDetokenizer, StopStringMatcher
from engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, filtered_probs
from engine.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "Layer streaming runs models larger than GPU memory.",
    "def main():\n    return 42\n",
    "Ünïcödé text: café, naïve, 你好世界, こんにちは, 😀🚀👍🏽",
]
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}\n"
    "    {%- if message.role not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Unknown role: ' + message.role) }}\n"
    "    {%- endif %}\n"
    "<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
# Exercises bos/eos/pad variables, namespace, tojson, tools/documents defaults, strftime_now, trim/lstrip.
FANCY = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}\n"
    "{% for m in messages %}\n"
    "    {% set ns.n = ns.n + 1 %}\n"
    "[{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | tojson }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n"
    "{% endfor %}\n"
    "{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}NODOCS{% endif %}\n"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}\n"
    "year={{ strftime_now('%Y') }} pad={{ pad_token }} {{ dict(a=1) | tojson }}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    [{"role": "user", "content": "Translate 'cat' to 中文 😺, say \"meow\"."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And  3+3?\n"},
    ],
]
MULTIBYTE = "Emoji 😀🚀👍🏽 and CJK 你好世界 こんにちは, café. 🇫🇷 done"


def _train_tokenizer() -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _write_model(path: Path, rust: RustTokenizer, **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rust.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def rust_tok() -> RustTokenizer:
    return _train_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, rust_tok: RustTokenizer) -> Path:
    path = _write_model(tmp_path_factory.mktemp("tok"), rust_tok, chat_template=CHATML,
                        bos_token="<|endoftext|>", eos_token={"content": "<|im_end|>", "special": True},
                        pad_token="<|endoftext|>", auto_map={"AutoTokenizer": ["evil.Tok", None]})
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return path


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


# ----------------------------------------------------------------------------------------- tokenizer
def test_round_trip_and_special_tokens(tok: Tokenizer) -> None:
    for text in [*CORPUS, MULTIBYTE, "unseen words: zebra ŽŸ ∑ 🦀"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.eos_ids == {0, 2}  # generation_config [0, 2] + eos_token <|im_end|> (= 2)
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


def test_decode_out_of_vocab_ids(tok: Tokenizer) -> None:
    ids = tok.encode("hello world")
    assert tok.decode([ids[0], 10**6, tok.vocab_size, -5, *ids[1:]]) == "hello world"


def test_missing_and_broken_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        Tokenizer.from_dir(tmp_path)


def test_add_bos_token_and_eos_forms(tmp_path: Path, rust_tok: RustTokenizer) -> None:
    d = _write_model(tmp_path, rust_tok, bos_token={"content": "<|endoftext|>"}, eos_token="<|endoftext|>",
                     add_bos_token=True)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    t = Tokenizer.from_dir(d)
    assert t.encode("hi")[0] == 0 and t.encode("hi", add_special_tokens=False)[0] != 0
    assert t.eos_ids == {0, 2}


def test_chat_template_missing_and_named(tmp_path: Path, rust_tok: RustTokenizer) -> None:
    t = Tokenizer.from_dir(_write_model(tmp_path / "none", rust_tok))
    with pytest.raises(ValueError, match="--no-chat"):
        t.apply_chat_template(CONVERSATIONS[0])
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    t = Tokenizer.from_dir(_write_model(tmp_path / "named", rust_tok, chat_template=named))
    assert t.apply_chat_template(CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are terse.")
    with pytest.raises(ValueError, match="Unknown role"):
        t.apply_chat_template([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("template", [CHATML, FANCY], ids=["chatml", "fancy"])
def test_chat_template_matches_transformers(tmp_path: Path, rust_tok: RustTokenizer, template: str) -> None:
    transformers = pytest.importorskip("transformers")
    d = _write_model(tmp_path, rust_tok, chat_template=template, bos_token="<|endoftext|>",
                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ours = Tokenizer.from_dir(d)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=template,
                                               bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>")
    for conv in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected


# ----------------------------------------------------------------------------------------- detok
def _stream(tok: Tokenizer, ids: list[int], **kw: object) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kw)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_incremental_detok_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
        assert "".join(_stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


def test_incremental_detok_multibyte(tok: Tokenizer) -> None:
    for text in [MULTIBYTE, *CORPUS, "😀" * 5 + "你" * 3]:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == text == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
    ids = tok.encode("😀")
    assert len(ids) > 1, "emoji should be split across byte tokens in this small vocab"
    assert _stream(tok, ids)[: len(ids) - 1] == [""] * (len(ids) - 1)


def test_incremental_detok_with_context(tok: Tokenizer) -> None:
    ctx, gen = tok.encode("Hello 你"), tok.encode("好世界 😀 ok")
    pieces = _stream(tok, gen, context_ids=ctx)
    assert "".join(pieces) == tok.decode(ctx + gen)[len(tok.decode(ctx)):]


def test_stop_strings() -> None:
    m = StopStringMatcher(["<stop>", "END"])
    assert m.push("hello <st") == ("hello ", False)
    assert m.push("op> world") == ("", True)
    assert m.push("more") == ("", True) and m.flush() == ""
    m = StopStringMatcher(["<stop>"])
    assert m.push("a <st") == ("a ", False)
    assert m.push("uff") == ("<stuff", False)
    assert m.push("x <") == ("x ", False) and m.flush() == "<"
    m = StopStringMatcher(["END", "<stop>"])
    assert m.push("foo <stop> bar END") == ("foo ", True)
    m = StopStringMatcher(["ab"])
    out = [m.push(c) for c in "xxaaab tail"]
    assert "".join(t for t, _ in out) == "xxaa" and out[-1][1]
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher([""])


# ----------------------------------------------------------------------------------------- sampling
PARAM_SETS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=10, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=0.5, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=3, top_p=0.5, min_p=0.2),
    SamplingParams(temperature=2.0, top_k=1000, top_p=0.3),
]


def test_invalid_params() -> None:
    for kwargs, msg in [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                        ({"top_p": 1.5}, "top_p"), ({"min_p": 1.0}, "min_p"), ({"min_p": -0.1}, "min_p"),
                        ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
                        ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler(SamplingParams(), 100, "cpu")(logits), logits.argmax(-1))
    padded = torch.cat([logits, torch.full((4, 7), 100.0)], dim=1)  # padded vocab columns are never chosen
    out = Sampler(SamplingParams(), 100, "cpu", use_triton=True)(padded)
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(-1))


def test_repetition_penalty_matches_transformers() -> None:
    lp = pytest.importorskip("transformers.generation.logits_process", reason="transformers logits_process missing")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g) * 3
    rows = [[1, 2, 3, 2, 49], [4], [7, 8, 0, 0, 0, 9]]
    history = torch.full((3, 6), -1, dtype=torch.int64)
    for r, ids in enumerate(rows):
        history[r, : len(ids)] = torch.tensor(ids)
    for penalty in (1.3, 0.7):
        ours = apply_repetition_penalty(logits.clone(), history, penalty)
        proc = lp.RepetitionPenaltyLogitsProcessor(penalty=penalty)
        for r, ids in enumerate(rows):
            ref = proc(torch.tensor([ids]), logits[r : r + 1].clone())
            torch.testing.assert_close(ours[r : r + 1], ref, rtol=0, atol=0)
        assert torch.equal(ours[1, 49], logits[1, 49])  # -1 padding must not touch the last column


def test_batch_history_padding_greedy() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 9] = 5.0
    logits[:, 3] = 4.0
    history = torch.tensor([[9, 1, 2], [5, -1, -1]])
    out = Sampler(SamplingParams(repetition_penalty=2.0), 10, "cpu")(logits, history)
    assert out.tolist() == [3, 9]


def _hf_filtered(lp: object, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    warpers = [lp.TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(lp.TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p=p.top_p))
    if p.min_p > 0.0:
        warpers.append(lp.MinPLogitsWarper(min_p=p.min_p))
    scores = logits.clone()
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("params", PARAM_SETS, ids=str)
def test_filtered_probs_match_transformers(params: SamplingParams) -> None:
    lp = pytest.importorskip("transformers.generation.logits_process", reason="transformers logits_process missing")
    logits = torch.randn(5, 200, generator=torch.Generator().manual_seed(params.top_k)) * 2
    torch.testing.assert_close(filtered_probs(logits, params), _hf_filtered(lp, logits, params),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("params", PARAM_SETS[:4], ids=str)
def test_triton_filtered_probs_agree(params: SamplingParams) -> None:
    ks = pytest.importorskip("kernels.sampling", reason="kernels.sampling (Triton) not importable")
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(3))
    got = ks.filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    torch.testing.assert_close(got, filtered_probs(logits, params), rtol=0, atol=1e-5)


def test_seeded_sampling_reproducible() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    runs = []
    for _ in range(2):
        sampler = Sampler(params, 64, "cpu")
        runs.append(torch.stack([sampler(logits) for _ in range(20)]))
    assert torch.equal(runs[0], runs[1])
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=99), 64, "cpu")
    assert not torch.equal(runs[0], torch.stack([other(logits) for _ in range(20)]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=0),
                                    SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05, seed=1)],
                         ids=str)
def test_empirical_frequencies(params: SamplingParams) -> None:
    n = 20_000
    base = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8]])
    draws = Sampler(params, 8, "cpu")(base.expand(n, 8).contiguous())
    freq = torch.bincount(draws, minlength=8).float() / n
    expected = filtered_probs(base, params)[0]
    assert (freq - expected).abs().max().item() < 0.02
    assert freq[expected == 0].sum().item() == 0.0
