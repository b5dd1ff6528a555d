"""The sampling settings a model's authors ship with it, for what a server request leaves out.

A Hugging Face model directory's ``generation_config.json`` names them (Qwen2.5-Instruct: temperature 0.7,
top_p 0.8, top_k 20, repetition_penalty 1.05; Llama 3.1 Instruct: temperature 0.6, top_p 0.9); llama.cpp's
converter copies them into a GGUF's ``general.sampling.*`` keys. OpenAI's own defaults (temperature 1, no
filters) sample a small model into nonsense: the real SmolLM2-135M asked for the capital of France answered
"Elle France, la Francie - where people from France visit..." at temperature 1 and "The capital of France is
Paris." at 0. So the server, like vLLM (its ``--generation-config auto``), starts from the model's settings
and lets every field a request gives win (``engine.serve --generation-config openai`` keeps OpenAI's).
``do_sample`` is not read (neither does vLLM): a client asks for greedy decoding with temperature 0.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# field -> (type, lowest, highest, whether each bound is allowed): the ranges engine.serving.protocol accepts
FIELDS: dict[str, tuple[type, float, float, bool, bool]] = {
    "temperature": (float, 0.0, 2.0, True, True), "top_p": (float, 0.0, 1.0, False, True),
    "top_k": (int, 0, 1 << 31, True, True), "min_p": (float, 0.0, 1.0, True, False),
    "repetition_penalty": (float, 0.0, 10.0, False, True)}
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}


def sampling_defaults(raw: Mapping[str, Any], source: str) -> dict[str, float | int]:
    """The sampling fields of ``raw`` (generation_config.json's names) that are numbers in range; a value out of
    range or of the wrong type is left out with a warning naming ``source``."""
    out: dict[str, float | int] = {}
    for name, (kind, low, high, low_ok, high_ok) in FIELDS.items():
        value = raw.get(name)
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high) \
            and (kind is float or value == int(value))
        if not ok:
            log.warning("%s: ignoring %s=%r (expected a number in %s%s, %s%s); requests fall back to OpenAI's "
                        "default for it", source, name, value, "[" if low_ok else "(", low, high,
                        "]" if high_ok else ")")
            continue
        out[name] = kind(value)
    return out


def from_dir(model_dir: Path) -> dict[str, float | int]:
    """:func:`sampling_defaults` of ``model_dir/generation_config.json`` ({} without the file; a file that is
    not a JSON object is the tokenizer's error, which reads it first)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = {}
    return sampling_defaults(raw, str(path)) if isinstance(raw, dict) else {}


def from_gguf(metadata: Mapping[str, Any], source: str) -> dict[str, float | int]:
    """:func:`sampling_defaults` of a GGUF's ``general.sampling.*`` keys."""
    return sampling_defaults({field: metadata[key] for key, field in GGUF_KEYS.items() if key in metadata}, source)


def describe(defaults: Mapping[str, float | int]) -> str:
    """``temperature 0.7, top_p 0.8`` (or ``none``)."""
    return ", ".join(f"{k} {v:g}" for k, v in defaults.items()) or "none"
