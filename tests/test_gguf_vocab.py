"""GGUF tokenizers against transformers' GGUF tokenizer (and against the tokenizer.json they came from).

* ``gpt2`` (byte-level BPE with merges): a tiny Qwen2-style tokenizer written into a GGUF by
  ``engine.gguf.writer``; ids must equal transformers' reading of the same file and the original
  ``tokenizer.json``.
* ``llama`` (SentencePiece BPE with scores, no merges, byte fallback): a small BPE trained here
  with ``▁`` spaces, stored as llama.cpp does (``<unk>``, ``<s>``, ``</s>``, 256 byte tokens, scored
  pieces); ids must equal transformers' GGUF tokenizer, which also derives the merges from the scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

from engine.gguf import open_gguf
from engine.synth.tokenizer import _CORPUS
from engine.tokenizer import Tokenizer

TEXTS = ["Hello world", " leading space", "multiple   spaces\tand tabs", "new\nlines\n\n", "über café 日本語 🙂",
         "The quick brown fox jumps over the lazy dog.", "x" * 40, "", "<s> and </s> written out", "12345 + 678"]


def hf_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def gpt2_gguf(tmp_path_factory, tiny_qwen2_dir) -> Path:
    from engine.gguf.writer import write_gguf

    return write_gguf(tiny_qwen2_dir, tmp_path_factory.mktemp("gguf") / "q.gguf", "Q8_0")[0]


def test_gpt2_vocab_matches_transformers_and_source(gpt2_gguf, tiny_qwen2_dir):
    _, ckpt, ours = open_gguf(gpt2_gguf)
    ref, source = hf_gguf_tokenizer(gpt2_gguf), Tokenizer.from_dir(tiny_qwen2_dir)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids == source.encode(text), text
        assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.eos_ids == source.eos_ids
    ckpt.close()


def _spm_tokens() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style scored vocabulary: specials, 256 byte tokens, then BPE pieces by merge rank."""
    bpe = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bpe.train_from_iterator([_CORPUS] * 4, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    pieces = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, (piece, _) in enumerate(pieces):
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)
            scores.append(-float(rank))
    return tokens, scores, types


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    tokens, scores, types = _spm_tokens()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocab_matches_transformers(spm_gguf):
    from engine.gguf.reader import open_gguf_files
    from engine.gguf.vocab import tokenizer_from_gguf

    ours = tokenizer_from_gguf(open_gguf_files(spm_gguf).metadata, "spm.gguf")
    ref = hf_gguf_tokenizer(spm_gguf)
    assert ours.add_bos_token is True and ours.bos_id == 1 and ours.eos_ids == {2}
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == 1  # SentencePiece files without the flag get BOS, as in llama.cpp
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert any(len(ours.encode(t)) < len(t) for t in TEXTS)  # merges happened
    assert "<0xF0>" in [ref.convert_ids_to_tokens(i) for i in ours.encode("🙂")]  # byte fallback


def test_unknown_tokenizer_model_is_named():
    from engine.gguf.vocab import tokenizer_from_gguf

    with pytest.raises(ValueError, match=r"'bert'.*supported: gpt2, llama"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")


def test_a_sentencepiece_reply_cut_inside_a_character_ends_in_one_replacement(spm_gguf):
    """Byte fallback decodes a window's whole byte run to U+FFFD once it holds an incomplete character, earlier
    complete characters included; a reply cut after one byte of its second character ended "日���", now "日�"."""
    from engine.detok import IncrementalDetokenizer
    from engine.gguf.reader import open_gguf_files
    from engine.gguf.vocab import tokenizer_from_gguf

    tok = tokenizer_from_gguf(open_gguf_files(spm_gguf).metadata, "spm.gguf")
    ids = tok.encode("日本", add_special_tokens=False)
    assert len(ids) == 7  # "▁" and six byte tokens
    for cut, want in ((4, " 日"), (5, " 日\ufffd"), (6, " 日\ufffd"), (7, " 日本")):
        d = IncrementalDetokenizer(tok, skip_special_tokens=True, context_ids=tok.encode("hi"))
        assert "".join(d.push(i) for i in ids[:cut]) + d.flush() == want, cut
