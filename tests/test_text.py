"""engine.text: what makes text unfit for the tokenizer, said the way a user can act on it."""

from __future__ import annotations

import pytest

from engine.text import utf8_problem


@pytest.mark.parametrize("text", ["", "plain", "café 😀 漢字", "\u0000\ufffd"])
def test_valid_text_has_no_problem(text):
    assert utf8_problem(text) is None


@pytest.mark.parametrize("text,expected", [
    ("ab\ud800", "character 2 is an unpaired surrogate (U+D800)"),
    ("\udfff", "character 0 is an unpaired surrogate (U+DFFF)"),
    (b"caf\xe9".decode("utf-8", "surrogateescape"),
     "character 3 is an unpaired surrogate (U+DCE9, from the byte 0xe9 that is not UTF-8)"),
])
def test_unpaired_surrogates_are_named(text, expected):
    assert utf8_problem(text) == expected


def test_the_tokenizer_refuses_them_with_a_value_error(tiny_qwen2_dir):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    assert tok.encode("hello")
    with pytest.raises(ValueError, match="not valid Unicode: character 1 is an unpaired surrogate"):
        tok.encode("h\ud800")
