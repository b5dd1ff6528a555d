"""The OpenAI response shapes of a request: the full response, its streamed chunks and its usage."""

from __future__ import annotations

import time
import uuid
from typing import Any

from engine.serving.sequence import Logprob, Sequence
from engine.serving.tools import parse_tool_calls
from engine.token_bytes import split_utf8, token_bytes


def usage(prompt_tokens: int, seqs: list[Sequence]) -> dict:
    completion = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


class Reply:
    """Builds the response (or its chunks) of one request: ``chat`` or text completion."""

    def __init__(self, chat: bool, model: str, tokenizer=None) -> None:
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.tools = False  # the prompt offered tools: the text is parsed for calls (engine.serving.tools)
        self.max_calls: int | None = None  # 1 for parallel_tool_calls: false
        self._offsets: dict[int, tuple[int, bytes]] = {}  # completions: each choice's text offset, open bytes
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, seqs: list[Sequence], prompt_tokens: int) -> dict:
        """The non-streamed response."""
        choices = []
        for s in seqs:
            body = ({"message": {"role": "assistant", "content": s.text}} if self.chat else {"text": s.text})
            finish = s.finish_reason
            if self.tools:
                content, calls = parse_tool_calls(s.text, self.max_calls)
                body["message"] = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
                finish = self.finish_reason(finish, bool(calls))
            lp = self.logprobs(s.index, s.logprobs) if s.params.logprobs is not None else None
            choices.append({"index": s.index, **body, "finish_reason": finish, "logprobs": lp})
        return {**self._head(self.object), "choices": choices, "usage": usage(prompt_tokens, seqs)}

    @staticmethod
    def finish_reason(reason: str | None, called: bool) -> str | None:
        """OpenAI's ``tool_calls`` for a choice that ended by itself after calling tools."""
        return "tool_calls" if called and reason == "stop" else reason

    def chunk(self, index: int, text: str | None, finish_reason: str | None, first: bool = False,
              with_usage: bool = False, logprobs: list[Logprob] | None = None,
              tool_calls: list[tuple[int, dict]] | None = None) -> dict:
        """One streamed chunk of choice ``index`` (``usage: null`` on it when usage is asked for);
        ``tool_calls``: (the call's index in the choice, the call) of calls completed since the last."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in tool_calls]
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        out = {**self._head(self.object + ("" if not self.chat else ".chunk")),
               "choices": [{**choice, "finish_reason": finish_reason,
                            "logprobs": None if logprobs is None else self.logprobs(index, logprobs)}]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, seqs: list[Sequence], prompt_tokens: int) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the request's usage."""
        obj = self.object + (".chunk" if self.chat else "")
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, seqs)}

    def logprobs(self, index: int, entries: list[Logprob]) -> dict:
        """OpenAI's logprobs object: chat ``{"content": [...]}``, completions tokens / token_logprobs / ... A token is
        the bytes it adds to the reply (engine.token_bytes), its text those bytes or, for part of a character,
        ``bytes:\\xNN...`` (each token decoded alone had given all of them U+FFFD: ``bytes`` could not rebuild the
        text, offsets ran past it, alternatives overwrote each other)."""
        tok = self.tokenizer
        if self.chat:
            def item(t: int, lp: float) -> dict:
                data = token_bytes(tok, t)
                return {"token": token_label(data), "logprob": lp, "bytes": list(data)}
            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries]}
        tokens = [token_label(token_bytes(tok, e.token_id)) for e in entries]
        at, pending = self._offsets.get(index, (0, b""))
        offsets = []
        for e in entries:  # a token's offset: the characters of the text before its first byte
            offsets.append(at)
            text, pending = split_utf8(pending + token_bytes(tok, e.token_id), "replace")
            at += len(text)
        self._offsets[index] = at, pending
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_label(token_bytes(tok, t)): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}


def token_label(data: bytes) -> str:
    """A token's text in logprobs: its bytes as UTF-8, or ``bytes:\\xNN...`` where they are not whole characters."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
