"""Tool calling in the chat API: the request's ``tools`` checked and handed to the chat template, and the
model's calls parsed out of its text into OpenAI's ``tool_calls``.

The format parsed is the one Qwen2.5, Qwen3 and the Hermes models are trained on, which their chat templates
ask for: each call a JSON object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and
``</tool_call>``. A template that does not mention ``<tool_call>`` gets a 400 for requests with tools (its
model would answer in a format this server does not parse). ``tool_choice`` ``"auto"`` lets the model decide,
``"none"`` offers no tools; ``"required"`` and a named function hold the reply to one such call, token by token
(engine.serving.constrain).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_tools(tools: list[dict], tool_choice: Any, template: str | None) -> tuple[bool, tuple[str, ...] | None]:
    """ValueError for tools, ``tool_choice`` or a chat template this server cannot serve; else whether the
    template gets the tools (not for ``tool_choice: "none"``) and, for a forced choice (``"required"``, or a
    named function), the tools the reply must call one of (engine.serving.constrain.call_format)."""
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                             f'"parameters": {{...}}}}}}')
        if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', "
                             f"got {fn.get('name')!r}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
        if not isinstance(fn.get("description", ""), str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        names.append(fn["name"])
    forced = _forced(tool_choice, names)
    if tool_choice == "none" or not tools:
        return False, None
    if template is None or OPEN not in template:
        raise ValueError("this model's chat template has no tool-call format this server parses (it parses "
                         "<tool_call>{...}</tool_call>, the Qwen2.5 / Qwen3 / Hermes format); leave tools out")
    return True, forced


def _forced(tool_choice: Any, names: list[str]) -> tuple[str, ...] | None:
    """The tools a forced ``tool_choice`` lets the reply call (None: not forced); ValueError for a bad one."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not names:
            raise ValueError('tool_choice "required" needs tools to choose from')
        return tuple(names)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(fn, dict):
        if fn.get("name") not in names:
            raise ValueError(f"tool_choice names {fn.get('name')!r}, which is not among the request's tools "
                             f"({', '.join(names) or 'none'})")
        return (fn["name"],)
    raise ValueError(f'tool_choice must be "auto", "none", "required" or {{"type": "function", "function": '
                     f'{{"name": ...}}}}, got {tool_choice!r}')


def template_tool_calls(calls: list[dict]) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls`` as chat templates take them: ``arguments`` a JSON
    string is given as the object it holds (templates write it back with ``tojson``)."""
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f'tool_calls[{j}] must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                             f'"arguments": "..."}}}}')
        fn = dict(fn)
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass  # left as the client sent it
        out.append({**c, "function": fn})
    return out


def _call(body: str) -> dict | None:
    """OpenAI's tool call for the JSON between the tags, or None when it is not one."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": text}}


def parse_tool_calls(text: str, max_calls: int | None = None) -> tuple[str | None, list[dict]]:
    """(the text outside the calls, or None when nothing else was said; the calls, the first ``max_calls``
    of them: OpenAI's ``parallel_tool_calls: false`` is 1). A block whose JSON is not a call stays in the
    text, as does an unclosed one."""
    stream = ToolCallStream(max_calls=max_calls)
    content = stream.feed(text) + stream.finish()
    return (content.strip() or None) if stream.calls else content, stream.calls


@dataclass
class ToolCallStream:
    """Splits a choice's streamed text into content and completed calls: text that may be the start of
    ``<tool_call>`` is held back until it is not, and a call goes out whole once its closing tag arrives."""
    calls: list[dict] = field(default_factory=list)
    max_calls: int | None = None  # calls past this many are dropped, their text too
    _held: str = ""

    def feed(self, text: str) -> str:
        """The content that can go out now; completed calls are appended to ``calls``."""
        self._held += text
        out = []
        while True:
            start = self._held.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._held, OPEN)
                out.append(self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                return "".join(out)
            end = self._held.find(CLOSE, start + len(OPEN))
            if end < 0:  # a call still arriving
                out.append(self._held[:start])
                self._held = self._held[start:]
                return "".join(out)
            call = _call(self._held[start + len(OPEN):end].strip())
            if call is None:
                out.append(self._held[:end + len(CLOSE)])
            else:
                out.append(self._held[:start])
                self._take(call)
            self._held = self._held[end + len(CLOSE):]

    def finish(self) -> str:
        """At the end of the choice: what is still held (an unclosed call is parsed if it is whole JSON)."""
        held, self._held = self._held, ""
        if held.startswith(OPEN) and (call := _call(held[len(OPEN):].strip())) is not None:
            self._take(call)
            return ""
        return held

    def _take(self, call: dict) -> None:
        if self.max_calls is None or len(self.calls) < self.max_calls:
            self.calls.append(call)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


RESERVED_TEMPLATE_NAMES = ("messages", "tools", "add_generation_prompt", "documents")


def template_kwargs(value) -> dict:
    """A request's ``chat_template_kwargs`` (vLLM's: extra variables for the chat template, e.g. Qwen3's
    ``{"enable_thinking": false}``) checked: a dict of names to values, none of the template's own."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise ValueError('chat_template_kwargs must be an object of template variable names to values, e.g. '
                         '{"enable_thinking": false}')
    if taken := [k for k in value if k in RESERVED_TEMPLATE_NAMES]:
        raise ValueError(f"chat_template_kwargs cannot set {taken[0]!r}: give it as its own field")
    return dict(value)

