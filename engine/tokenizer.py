"""Tokenizer and chat-template rendering for a local Hugging Face model directory.

Only data files are read (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
chat_template.jinja / chat_template.json, generation_config.json, config.json); ``auto_map`` and
custom tokenizer classes are ignored, so no remote code is ever executed.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from engine.text import utf8_problem

logger = logging.getLogger(__name__)

# Named special tokens transformers passes to chat templates (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> dict[str, Any]:
    """Read an optional JSON object file; {} if it does not exist, ValueError if it is broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {path}: {exc}; re-download or fix the file") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    """An eos_token_id entry (int, list of ints or null) as a list."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _select_template(raw: Any, source: Path) -> str | None:
    """Pick the template string: a plain string, or "default" from a list/dict of named templates."""
    if raw is None or isinstance(raw, str):
        return raw
    named: dict[str, Any] = {}
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
    elif isinstance(raw, dict):
        named = raw
    else:
        raise ValueError(f"{source}: chat_template should be a string or a list of {{name, template}} objects, "
                         f"got {raw!r}; fix it or run with --no-chat")
    template = named.get("default")
    if not isinstance(template, str):
        raise ValueError(
            f"{source}: chat_template has named templates {sorted(map(str, named))} but no 'default'; "
            "add a 'default' template or run with --no-chat"
        )
    return template


def _load_chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    """chat_template.jinja > chat_template.json > tokenizer_config.json (as transformers prefers)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        return _select_template(_read_json(json_file).get("chat_template"), json_file)
    return _select_template(tok_config.get("chat_template"), model_dir / "tokenizer_config.json")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Same as transformers: no HTML escaping, exposes json.dumps options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict` global as transformers exposes it (no attribute access to the dict type itself)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2 namespace that rejects underscore-prefixed attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not compile ({exc}); fix it or run with --no-chat") from exc


def _prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages, drop None values and alias reasoning fields, like transformers."""
    out = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {msg!r}")
        msg = {k: v for k, v in msg.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


class Tokenizer:
    """A fast (Rust) tokenizer plus the model's special tokens, eos ids and chat template.

    Build it with :meth:`from_dir`. Chat prompts rendered by :meth:`apply_chat_template` already
    contain the template's special tokens, so encode them with ``add_special_tokens=False``.
    """

    def __init__(self, tok: _HFTokenizer, special_tokens: dict[str, str], chat_template: str | None,
                 eos_ids: set[int], add_bos_token: bool | None = None) -> None:
        self._tok = tok
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.eos_ids = set(eos_ids)
        self.add_bos_token = add_bos_token
        bos = special_tokens.get("bos_token")
        self.bos_id: int | None = tok.token_to_id(bos) if bos is not None else None
        self._max_id = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Load tokenizer.json (+ optional tokenizer_config.json, generation_config.json) from ``model_dir``."""
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{tok_file} not found: this engine needs a fast tokenizer file; copy tokenizer.json from the "
                "model repository into the model directory (or convert a slow tokenizer with transformers' "
                "AutoTokenizer(...).save_pretrained)"
            )
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"cannot parse {tok_file}: {exc}; re-download the file") from exc
        config = _read_json(model_dir / "tokenizer_config.json")
        if "auto_map" in config or config.get("tokenizer_class") not in (None, "PreTrainedTokenizerFast"):
            logger.debug("ignoring tokenizer_class/auto_map in %s (no remote code)", model_dir)
        legacy = _read_json(model_dir / "special_tokens_map.json")
        special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name)) or _token_content(legacy.get(name))
            if content is not None:
                special[name] = content
        eos: set[int] = set(_as_id_list(_read_json(model_dir / "generation_config.json").get("eos_token_id")))
        eos.update(_as_id_list(_read_json(model_dir / "config.json").get("eos_token_id")))
        if "eos_token" in special and (eos_tok := tok.token_to_id(special["eos_token"])) is not None:
            eos.add(eos_tok)
        add_bos = config.get("add_bos_token")
        template = _load_chat_template(model_dir, config)
        logger.info("tokenizer: vocab %d, eos ids %s, chat template %s",
                    tok.get_vocab_size(with_added_tokens=True), sorted(eos), "yes" if template else "no")
        return cls(tok, special, template, eos, add_bos if isinstance(add_bos, bool) else None)

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor runs and add_bos_token is honoured.
        ValueError when ``text`` is not valid Unicode (:func:`engine.text.utf8_problem`)."""
        problem = utf8_problem(text)
        if problem:
            raise ValueError(f"the text is not valid Unicode: {problem}; send UTF-8 text")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens or self.add_bos_token is None or self.bos_id is None:
            return ids
        has_bos = bool(ids) and ids[0] == self.bos_id
        if self.add_bos_token and not has_bos:
            return [self.bos_id, *ids]
        if not self.add_bos_token and has_bos:
            plain = self._tok.encode(text, add_special_tokens=False).ids
            if not plain or plain[0] != self.bos_id:  # bos came from the post-processor, not the text
                return ids[1:]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids the tokenizer does not know (padded embedding rows) are skipped."""
        known = [i for i in ids if 0 <= i <= self._max_id]
        if len(known) != len(ids):
            logger.debug("decode: skipped %d out-of-vocabulary ids", len(ids) - len(known))
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's chat template exactly as transformers does (tokenize=False).

        Extra keyword arguments become template variables (e.g. ``enable_thinking=False``).
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json, "
                             "chat_template.jinja or chat_template.json); use --no-chat to send the raw prompt")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation; give at least one message")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        variables: dict[str, Any] = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return self._template.render(messages=_prepare_messages(messages),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(), an undefined name, the sandbox
            raise ValueError(f"chat template failed: {exc}") from exc
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:  # the template's own bug
            raise ValueError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
