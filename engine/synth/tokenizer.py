"""Synthetic byte-level BPE tokenizer for synthetic checkpoints (``engine.synth``).

A small BPE (~1k tokens: the embedded text runs out of merges before TRAIN_VOCAB_SIZE) is
trained with the ``tokenizers`` library on an embedded English text plus all printable ASCII,
with the ByteLevel pre-tokenizer/decoder of Qwen2 / Llama-3 (any UTF-8 text round-trips).
The family's special tokens are then added at their REAL ids (e.g. ``<|im_end|>`` = 151645).
``tokenizers`` renumbers ``added_tokens`` whose ids are not in the model vocabulary (they
would land right after the trained vocab), so the special tokens are also written into the
BPE model's vocabulary at their ids: the vocabulary has a gap between the trained tokens and
the special tokens, which ``tokenizers`` and transformers' tokenizers (including
``Qwen2Tokenizer``, which rebuilds the BPE from vocab + merges) load unchanged.
For tiny presets the special tokens are "relocated" right after the trained vocabulary.

:meth:`SynthTokenizer.fill` then gives every remaining id below the model's ``vocab_size`` a
generated pseudo-word (" bako", " Tumire", " fela,"): random weights pick ids all over the
vocabulary, and without these entries most of them would decode to nothing. The filler tokens
have no merges, so encoding never produces them; they only make decoded output visible.
"""

from __future__ import annotations

import copy
import json
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from engine.synth.presets import FAMILIES

TRAIN_VOCAB_SIZE = 1280

_SPLIT_REGEX = {
    "qwen": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

_CORPUS = """\
The old lighthouse stood at the edge of the harbour for more than two hundred years. Every evening the
keeper climbed the narrow stairs, trimmed the wick and wound the clockwork that turned the great lens.
Ships coming home through the fog looked for its slow white flash, and the people of the town said
that as long as the light was burning, nothing truly bad could happen to anyone at sea.

A language model reads text as a sequence of tokens. Each token is mapped to a vector, the vectors pass
through many layers of attention and feed-forward networks, and the model predicts which token should
come next. Training adjusts billions of parameters so that these predictions become more accurate, and
inference streams the weights of each layer from memory to the processor as quickly as possible.

In the spring the farmers plant wheat, barley and potatoes; in the summer they watch the sky and hope
for rain. When the harvest comes, the whole village works together: children carry water, the older
men sharpen the tools, and the women count the sacks before they are loaded onto the carts and taken
to the market in the city, which is about thirty miles away along a dusty road.

Please answer the question below. What is the capital of France? The capital of France is Paris.
How many days are there in a week? There are seven days in a week. Can you write a short poem about the
moon? Of course! Here is one: "Silver lantern, quiet and high, you light the road across the sky."

Numbers and symbols matter too: 0 1 2 3 4 5 6 7 8 9, 10, 100, 1000, 3.14159, 2025-01-31, 12:45,
$19.99, 50%, a+b=c, x*y/z, (parentheses), [brackets], {braces}, <angle>, "quotes", 'apostrophes',
e-mail: someone@example.com, path: /usr/local/bin, code: def main() -> None: return print("hello").

The committee met on Tuesday to discuss the new budget. After a long debate, they agreed to spend more
money on schools, roads and hospitals, and less on the celebration planned for the anniversary of the
city. The mayor thanked everyone for their patience and promised that the results would be published
next week, so that every citizen could read them and share their opinion with the council.
"""


@dataclass
class SynthTokenizer:
    """A built tokenizer: file contents plus the id layout of its special tokens."""

    tokenizer_json: dict[str, Any]
    tokenizer_config: dict[str, Any]
    special_ids: dict[str, int]
    id_shift: int = 0  # actual id = family's real id + id_shift (non-zero when relocated)
    size: int = 0  # largest token id + 1
    extra: dict[str, Any] = field(default_factory=dict)

    def remap(self, value: Any) -> Any:
        """Map a family token id (or list of ids, or None) to this tokenizer's ids."""
        if isinstance(value, list):
            return [self.remap(v) for v in value]
        return value if value is None else value + self.id_shift

    def remap_ids(self, config: dict[str, Any]) -> dict[str, Any]:
        """Remap the bos/eos/pad token ids of a (generation) config in place; returns it."""
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in config:
                config[key] = self.remap(config[key])
        return config

    def fill(self, vocab_size: int) -> None:
        """Give every id in [0, vocab_size) without a token a pseudo-word, so every id decodes to text."""
        vocab: dict[str, int] = self.tokenizer_json["model"]["vocab"]
        taken = set(vocab.values())
        if len(taken) >= vocab_size:
            return
        words = _pseudo_words(set(vocab))
        for i in range(vocab_size):
            if i not in taken:
                vocab[next(words)] = i
        self.size = max(self.size, vocab_size)

    def write(self, directory: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory``."""
        for name, data in (("tokenizer.json", self.tokenizer_json), ("tokenizer_config.json", self.tokenizer_config)):
            (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_CONSONANTS = "bdfgklmnprstvz"
_VOCALS = "aeiou"


def _pseudo_words(avoid: set[str]):
    """Endless distinct byte-level tokens that read as words: "Ġbako", "ĠTumire", "Ġfela," ("Ġ" is a space)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOCALS]
    k = 0
    while True:
        k += 1
        n, parts = k, []
        while n:
            n, r = divmod(n - 1, len(syllables))
            parts.append(syllables[r])
        word = "".join(parts)
        for token in ("Ġ" + word, "Ġ" + word.capitalize(), "Ġ" + word + ",", "Ġ" + word + "."):
            if token not in avoid:
                yield token


def _base_tokenizer(kind: str) -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the family's normalizer / pre-tokenizer."""
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    if kind == "qwen":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX[kind]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


@lru_cache(maxsize=4)
def _trained_json(kind: str) -> str:
    """Train the small BPE for a pre-tokenizer kind; returns the tokenizer.json text."""
    tok = _base_tokenizer(kind)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAIN_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CORPUS, string.printable], trainer=trainer)
    return tok.to_str()


def _post_processor(bos: str | None, bos_id: int | None) -> dict[str, Any]:
    """ByteLevel post-processor, plus a BOS template when the family prepends one."""
    byte_level = processors.ByteLevel(add_prefix_space=bos is not None, trim_offsets=False, use_regex=bos is not None)
    if bos is None:
        return json.loads(_proc_json(byte_level))
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return json.loads(_proc_json(processors.Sequence([byte_level, template])))


def _proc_json(proc: Any) -> str:
    """Serialize a post-processor through a throwaway tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.post_processor = proc
    return json.dumps(json.loads(tok.to_str())["post_processor"])


def build_tokenizer(family: str, relocate: bool = False) -> SynthTokenizer:
    """Build the synthetic tokenizer of ``family`` (a key of ``engine.synth.presets.FAMILIES``).

    With ``relocate`` the special tokens follow the trained vocabulary directly (tiny presets);
    otherwise they sit at the family's real ids.
    """
    fam = FAMILIES[family]
    data = json.loads(_trained_json(fam["pretokenizer"]))
    vocab: dict[str, int] = data["model"]["vocab"]
    trained = len(vocab)
    base = trained if relocate else fam["special_base"]
    special_ids = {content: base + i for i, (content, _) in enumerate(fam["specials"])}
    if not relocate and base < trained:
        raise ValueError(f"family {family}: special tokens at {base} overlap the trained vocab")
    vocab.update(special_ids)
    data["added_tokens"] = [
        {"id": special_ids[c], "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": sp}
        for c, sp in fam["specials"]
    ]
    bos = fam["bos_prepend"]
    data["post_processor"] = _post_processor(bos, special_ids.get(bos) if bos else None)
    config = _tokenizer_config(fam, data["added_tokens"])
    return SynthTokenizer(
        tokenizer_json=data, tokenizer_config=config, special_ids=special_ids,
        id_shift=base - fam["special_base"], size=max(vocab.values()) + 1, extra={"trained_vocab": trained},
    )


def _tokenizer_config(fam: dict[str, Any], added: list[dict[str, Any]]) -> dict[str, Any]:
    """tokenizer_config.json contents for a family."""
    config: dict[str, Any] = copy.deepcopy(fam["tokenizer_config"])
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
    }
    if fam["tokenizer_config"]["tokenizer_class"] == "Qwen2Tokenizer":
        config["additional_special_tokens"] = [
            t["content"] for t in added if t["special"] and t["content"] != config.get("pad_token")
        ]
    config["chat_template"] = fam["chat_template"]
    return dict(sorted(config.items()))
