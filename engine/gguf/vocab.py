"""The tokenizer a GGUF file describes, built as a ``tokenizers`` tokenizer.

GGUF stores no ``tokenizer.json``: it holds the vocabulary (``tokenizer.ggml.tokens``), the token
kinds (``token_type``: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), merges or scores,
the special token ids and the chat template. Two families are rebuilt here:

* ``gpt2``: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM ...); ``tokenizer.ggml.pre`` names the
  pre-tokenizer split the merges were learned with;
* ``llama``: SentencePiece BPE (Llama 2, Mistral ...) with ``▁`` for spaces and byte fallback;
  merges come from the file or, when absent, from the scores (best-scored pieces merge first).

Control tokens become special added tokens and user-defined ones plain added tokens, so both
are matched whole in the text (as llama.cpp and transformers' GGUF loader do).
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers, processors

from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONTROL, USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex; others use the GPT-2 byte-level regex
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT}
SPECIAL_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# special tokens llama.cpp also ends generation on, by their text (its "end of generation" set), since a
# GGUF stores one eos id where generation_config.json listed several (e.g. Qwen's <|endoftext|>, <|im_end|>)
EOG_TEXTS = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> _HFTokenizer:
    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _HFTokenizer(models.BPE(vocab, pairs, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    split = PRE_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece merges implied by a scored vocabulary: every split of a token into two vocabulary
    pieces, best token score first (ties: longer left piece, then longer right piece, then vocabulary
    order), the order transformers' GGUF tokenizer derives."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        found.extend(sorted(local, key=lambda x: (ids[x[0]], ids[x[1]])))
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> _HFTokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif (scores := meta.get("tokenizer.ggml.scores")) is not None:
        pairs = merges_from_scores(tokens, scores)
    else:
        raise ValueError("the GGUF's SentencePiece vocabulary has neither merges nor scores; it cannot be tokenized")
    tok = _HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, fuse_unk=True, byte_fallback=True,
                                  dropout=None))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _add_tokens(tok: _HFTokenizer, tokens: list[str], types: list[int], byte_level: bool,
                special_names: list[str]) -> None:
    alphabet = set(byte_alphabet().values()) if byte_level else None
    control = {tokens[i] for i, k in enumerate(types) if k == CONTROL}
    control.update(special_names)
    # a "control" token spelled outside the byte alphabet is a llama.cpp mislabel of a normal token
    special = [t for t in tokens if t in control and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = tok.get_vocab(with_added_tokens=True)
    user = [t for i, t in enumerate(tokens) if i < len(types) and types[i] == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _post_processor(tok: _HFTokenizer, special: dict[str, str], add_bos: bool, add_eos: bool) -> None:
    """BOS / EOS around every encoded text (as transformers' tokenizer of the file does: a text that
    itself starts with the BOS string still gets one more)."""
    bos, eos = (special.get("bos_token") if add_bos else None), (special.get("eos_token") if add_eos else None)
    if bos is None and eos is None:
        return
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    pairs = [(t, tok.token_to_id(t)) for t in (bos, eos) if t is not None]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)


def _check_lists(meta: dict[str, Any], source: str) -> None:
    """ValueError when a tokenizer array of the file holds values of the wrong type (a corrupt file)."""
    for key, kinds, what in (("tokens", str, "strings"), ("merges", str, "strings"),
                             ("token_type", int, "integers"), ("scores", (int, float), "numbers")):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is not None and not (isinstance(values, list) and all(isinstance(v, kinds) for v in values)):
            raise ValueError(f"{source} is corrupt: tokenizer.ggml.{key} should be an array of {what}; re-download it")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{source} is corrupt: tokenizer.chat_template should be a string; re-download it")


def tokenizer_from_gguf(meta: dict[str, Any], source: str) -> Tokenizer:
    """The engine's Tokenizer (vocabulary, special tokens, eos ids, chat template) from GGUF metadata."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if tokens is None or kind is None:
        raise ValueError(f"{source} has no tokenizer (tokenizer.ggml.model / tokens); this engine needs one")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    _check_lists(meta, source)
    try:  # the tokenizers library raises a bare Exception for a merge of tokens not in the vocabulary
        tok = (_byte_level(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
               if kind == "gpt2" else _sentencepiece(meta, tokens))
    except ValueError:  # ours, worded already (no merges nor scores)
        raise
    except Exception as e:
        raise ValueError(f"{source} is corrupt: its tokenizer cannot be built ({e}); re-download it") from None
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in SPECIAL_KEYS.items()}
    special = {name: tokens[i] for name, i in ids.items() if isinstance(i, int) and 0 <= i < len(tokens)}
    _add_tokens(tok, tokens, types, kind == "gpt2", list(special.values()))
    eos = {meta[k] for k in EOS_KEYS if isinstance(meta.get(k), int)}
    eos.update(i for i, k in enumerate(types) if k in (CONTROL, USER_DEFINED) and tokens[i] in EOG_TEXTS)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))  # llama.cpp's default for SentencePiece
    _post_processor(tok, special, add_bos, bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    template = meta.get("tokenizer.chat_template")
    log.info("gguf tokenizer: %s, %d tokens, eos ids %s, add_bos %s, chat template %s", kind, len(tokens),
             sorted(eos), add_bos, "yes" if template else "no")
    return Tokenizer(tok, special, template, eos, add_bos)
