"""OpenAI request bodies (validated with pydantic) and the error envelope (the responses: engine.serving.reply)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from engine.sampling import SEED_MAX, SEED_MIN
from engine.serving.params import FieldError, SamplingParams
from engine.serving.tools import check_tools, template_kwargs, template_tool_calls
from engine.text import utf8_problem


# what a request that leaves a field out gets when the model names no default for it (OpenAI's; top_k 0 and
# min_p 0 disable those filters, repetition_penalty 1 none)
OPENAI_DEFAULTS: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                           "repetition_penalty": 1.0}


TokenId = Annotated[int, Field(strict=True, ge=0)]  # a token id in a body: an integer, not a string or a bool


def _check_text(field: str, text: str) -> None:
    """ValueError naming ``field`` when ``text`` cannot reach the tokenizer (a JSON "\\ud800" escape)."""
    if problem := utf8_problem(text):
        raise ValueError(f"{field} is not valid Unicode: {problem}; send UTF-8 text")


def _logit_bias(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` ({"token id": bias}) as SamplingParams takes it; ValueError for a key that is
    not a token id."""
    out = []
    for key, bias in (value or {}).items():
        if not re.fullmatch(r"[0-9]+", key.strip()):  # ASCII digits: str.isdigit() and int() take others ("²", "١")
            raise FieldError("logit_bias", f"logit_bias keys must be token ids (decimal digits), got {key!r}")
        out.append((int(key), bias))
    return tuple(sorted(out))


def response_format(value: dict | None) -> tuple[str, str | None]:
    """(the format's type, its schema as canonical JSON text for ``json_schema``); ValueError for others."""
    kind = (value or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError(f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}')
    if kind != "json_schema":
        return kind, None
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError('response_format json_schema must be {"name": ..., "schema": {...}}')
    return kind, json.dumps(spec["schema"])  # the key order kept: properties come in the schema's order


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions (unknown fields are ignored, as OpenAI's)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # left out: the served model (as vLLM and llama.cpp's server take it)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's -1 (and 0) disable top-k
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # torch's generators take 64 bits
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    response_format: dict | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's) -> bias
    stop_token_ids: list[TokenId] | None = None  # vLLM's: ids past the vocabulary are refused by the scheduler

    def logprob_count(self) -> int | None:
        """Top alternatives per token when logprobs are asked for, else None."""
        return None

    def sampling(self, max_tokens: int | None, defaults: Mapping[str, float | int] | None = None) -> SamplingParams:
        """The engine's parameters: what the request gives, else the model's ``defaults``
        (``engine.generation_defaults``), else OpenAI's (temperature 1, no filters)."""
        kind, schema = response_format(self.response_format)
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported; use n to get several completions")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        given = {**OPENAI_DEFAULTS, **(defaults or {}),
                 **{k: v for k in OPENAI_DEFAULTS if (v := getattr(self, k)) is not None}}
        return SamplingParams(
            temperature=given["temperature"], top_p=given["top_p"], top_k=max(0, given["top_k"]),
            min_p=given["min_p"], seed=self.seed, stop=tuple(stop), n=self.n or 1,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=given["repetition_penalty"], max_tokens=max_tokens, ignore_eos=self.ignore_eos,
            logprobs=self.logprob_count(), json_object=kind == "json_object", json_schema=schema,
            logit_bias=_logit_bias(self.logit_bias), stop_token_ids=tuple(self.stop_token_ids or ()))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant turn's calls (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = template_tool_calls(self.tool_calls)
        out.update({k: v for k in ("tool_call_id", "name") if (v := getattr(self, k)) is not None})
        return out


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # false: only the first call of a turn is kept
    chat_template_kwargs: dict | None = None  # vLLM's: extra chat-template variables ({"enable_thinking": false})
    functions: list | None = None  # OpenAI's deprecated form of tools: refused with the way to send them
    function_call: Any = None
    modalities: list | None = None
    audio: Any = None
    logprobs: bool | None = False
    _tools_used: bool = PrivateAttr(False)
    _forced: tuple[str, ...] | None = PrivateAttr(None)
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def text_chars(self) -> int:
        """How much text :meth:`prompts` renders and tokenizes (characters; tools count as a long text)."""
        if self.tools:
            return 1 << 30
        return sum(len(m.as_template_input()["content"]) for m in self.messages)

    def prompts(self, tokenizer) -> list[list[int]]:
        """The conversation rendered with the chat template (with the request's tools, engine.serving.tools),
        as the one prompt of this request."""
        self._refuse_unserved()
        self._tools_used, self._forced = check_tools(self.tools or [], self.tool_choice, tokenizer.chat_template)
        for i, m in enumerate(self.messages):
            _check_text(f"messages[{i}].content", m.as_template_input()["content"])
        text = tokenizer.apply_chat_template([m.as_template_input() for m in self.messages],
                                             add_generation_prompt=True, **template_kwargs(self.chat_template_kwargs),
                                             **({"tools": self.tools} if self._tools_used else {}))
        return [tokenizer.encode(text, add_special_tokens=False)]

    def _refuse_unserved(self) -> None:
        """ValueError for fields whose meaning this server cannot give (rather than ignoring them)."""
        if self.functions is not None or self.function_call is not None:
            raise ValueError('functions / function_call are OpenAI\'s deprecated form of tools: send tools=[{"type": '
                             '"function", "function": {...}}] and tool_choice instead')
        if self.audio is not None or (self.modalities and list(self.modalities) != ["text"]):
            raise ValueError('this server answers in text only: leave audio out and modalities at ["text"]')

    def sampling(self, max_tokens: int | None, defaults: Mapping[str, float | int] | None = None) -> SamplingParams:
        """As the base request's, with a forced ``tool_choice``'s tools (after :meth:`prompts`)."""
        params = super().sampling(max_tokens, defaults)
        return dataclasses.replace(params, tool_call=self._forced) if self._forced else params

    @property
    def tools_used(self) -> bool:
        """Whether the prompt offered tools, so the replies are parsed for calls (after :meth:`prompts`)."""
        return self._tools_used

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # refused (text insertion), not silently ignored

    def logprob_count(self) -> int | None:
        return self.logprobs

    def text_chars(self) -> int:
        """How much text :meth:`prompts` tokenizes (characters; token ids need none)."""
        p = self.prompt
        return len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str))

    def prompts(self, tokenizer) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of token ids, or a list of either (a batch)."""
        if self.echo:
            raise ValueError("echo is not supported by this server; leave it out")
        if self.suffix:
            raise ValueError("suffix (text insertion) is not supported by this server; leave it out")
        p = self.prompt
        batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        for i, x in enumerate(batch):
            if isinstance(x, str):
                _check_text("prompt" if batch is not p else f"prompt[{i}]", x)
        return [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in batch]

    @property
    def token_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
