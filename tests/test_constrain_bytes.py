"""The format checker (engine.serving.constrain) reads a token as the bytes it adds to the reply (engine.token_bytes),
not as the token decoded alone: a SentencePiece piece keeps its leading space, and a character split over byte
tokens is checked once its last byte is in (before, each byte token read as U+FFFD, so a schema's non-ASCII literal
could not be written and the checker fell back to end of sequence)."""

from __future__ import annotations

import json

import pytest

from engine.serving.constrain import Format, reply_format
from engine.serving.params import SamplingParams
from engine.token_bytes import token_bytes
from engine.tokenizer import Tokenizer


def _schema_format(tok, schema: dict) -> Format:
    return reply_format(SamplingParams(json_schema=json.dumps(schema)), tok)


def _takes(fmt: Format, ids: list[int], eos: set[int]) -> bool:
    for i in ids:
        if not fmt.allows(i, eos):
            return False
        fmt.advance(i, eos)
    return True


def test_a_split_character_of_a_literal_is_written_and_a_wrong_one_is_not(tiny_qwen2_dir):
    """The tiny BPE spells "東京" in six byte tokens: each is allowed in turn and the enum closes; the first byte of
    "果" (another character with the same lead byte) is allowed, its second is not (no such literal)."""
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    eos = tok.eos_ids
    ids = tok.encode('"東京"', add_special_tokens=False)
    assert len(ids) == 8 and tok.decode(ids[1:2]) == "\ufffd"  # byte tokens
    fmt = _schema_format(tok, {"enum": ["東京", "大阪"]})
    assert _takes(fmt, ids, eos) and fmt.closed and not fmt.pending
    wrong = tok.encode('"果"', add_special_tokens=False)
    fmt = _schema_format(tok, {"enum": ["東京", "大阪"]})
    assert _takes(fmt, wrong[:2], eos) and not fmt.allows(wrong[2], eos)
    assert b"".join(token_bytes(tok, i) for i in ids).decode() == '"東京"'


def test_a_string_does_not_close_inside_a_character(tiny_qwen2_dir):
    """JSON mode: after the first byte of a character, a closing quote is not allowed (it gave {"a": "\ufffd"})."""
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    eos = tok.eos_ids
    fmt = reply_format(SamplingParams(json_object=True), tok)
    head = tok.encode('{"a": "', add_special_tokens=False)
    byte = tok.encode("東", add_special_tokens=False)[0]
    quote = tok.encode('"', add_special_tokens=False)
    assert _takes(fmt, head + [byte], eos) and fmt.pending
    assert len(quote) == 1 and not fmt.allows(quote[0], eos)


@pytest.fixture(scope="module")
def spm():
    from engine.gguf.vocab import tokenizer_from_gguf
    from tests.test_gguf_vocab import _spm_tokens

    tokens, scores, types = _spm_tokens()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    return tokenizer_from_gguf(meta, "spm.gguf")


def test_a_sentencepiece_piece_keeps_its_space(spm):
    """"▁and" adds " and" to a reply: not allowed where an enum needs "and" right after its quote ("an" + "d" is),
    though decoded alone it reads "and"."""
    eos = spm.eos_ids
    space_and = spm.encode(" and", add_special_tokens=False)
    assert [spm._tok.id_to_token(i) for i in space_and] == ["▁and"] and spm.decode(space_and) == "and"
    assert token_bytes(spm, space_and[0]) == b" and"
    quote = spm.token_to_id('"')
    fmt = _schema_format(spm, {"enum": ["and"]})
    assert _takes(fmt, [quote], eos) and not fmt.allows(space_and[0], eos)
    assert _takes(fmt, [spm.token_to_id("an"), spm.token_to_id("d"), quote], eos) and fmt.closed


def test_logprobs_rebuild_the_text_of_split_characters(tiny_qwen2_dir):
    """Chat logprobs' ``bytes`` join into the reply's bytes, completions' offsets point at the character a token's
    first byte is in, and alternatives that are parts of different characters keep separate entries."""
    from engine.serving.reply import Reply
    from engine.serving.sequence import Logprob

    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    text = "a東京b"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 8
    alts = tok.encode("果", add_special_tokens=False)  # its first byte equals 東's; the others differ
    entries = [Logprob(i, -0.5, [(i, -0.5), (alts[1], -2.0), (alts[2], -3.0)]) for i in ids]
    chat = Reply(True, "m", tok).logprobs(0, entries)["content"]
    assert b"".join(bytes(c["bytes"]) for c in chat) == text.encode()
    assert chat[1]["token"].startswith("bytes:\\x") and chat[0]["token"] == "a"
    reply = Reply(False, "m", tok)
    first, rest = reply.logprobs(0, entries[:2]), reply.logprobs(0, entries[2:])  # streamed in two chunks
    assert first["text_offset"] + rest["text_offset"] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert all(len(top) == 3 for top in first["top_logprobs"] + rest["top_logprobs"])
