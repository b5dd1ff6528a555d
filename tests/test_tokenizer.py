"""CPU tests for engine/tokenizer.py and engine/detok.py (transformers as the chat-template reference)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from engine.detok import IncrementalDetokenizer, StopStringMatcher
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
    with pytest.raises(ValueError, match="chat_template should be a string or a list of {name, template} objects, "
                                         "got 5"):
        Tokenizer.from_dir(_write_model(tmp_path / "number", rust_tok, chat_template=5))


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
