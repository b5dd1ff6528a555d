"""Batch generation in Python over the serving scheduler: ``LLM(model).generate(prompts, params)``.

    from engine import LLM, SamplingParams
    llm = LLM("qwen2.5-7b", vram_budget="6GB", max_batch=16)
    for out in llm.generate(["The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)

All prompts are queued at once; the scheduler keeps ``max_batch`` of them in flight, admitting the
next as soon as one finishes, so every pass over the (streamed) weights serves a full batch.
"""

from __future__ import annotations

import threading

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.engine import Engine, EngineOptions, open_model
from engine.options import fit_context
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Logprob, Sequence
from engine.serving.tools import check_tools, parse_tool_calls, template_kwargs, template_tool_calls

log = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    """One generated continuation: ``finish_reason`` is "stop" (eos or a stop string) or "length", or
    "abort" with ``error`` saying why the engine stopped it (non-finite logits: an fp16 overflow)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[Logprob] | None = None  # with SamplingParams(logprobs=k)
    error: str | None = None
    tool_calls: list[dict] | None = None  # chat(..., tools=...): the calls in ``text``, OpenAI's shape


@dataclass
class RequestOutput:
    """A prompt and its ``n`` completions."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    """A loaded model for offline batch jobs (the same scheduler as ``engine.serve``)."""

    def __init__(self, model: str | Path | None = None, vram_budget: str | int | None = None, *,
                 max_batch: int = 8, max_context: int | None = None, device: str = "auto", dtype: str = "auto",
                 kernels: str = "auto", host_budget: str | int | None = None, prefill_chunk: int | None = None,
                 kv_cache: str = "slots", block_size: int = 16) -> None:
        """``model``: a directory, HF repo id or alias (None: the embedded tiny random-weight model).
        Budgets accept "6GB", "6GiB" or bytes. ``kv_cache="paged"`` reuses the KV blocks of prompt
        prefixes seen before (this LLM keeps one scheduler, so later calls hit earlier prompts).
        ``prefill_chunk`` None: 2048 tokens, or fewer where the budget needs it (the planner's pick, as the CLI);
        ``max_context`` None: 4096, or the model's trained context if shorter (past it, the plan's notes say so)."""
        from engine.cli_session import load_engine, resolve_or_default
        from memory.units import parse_size

        def size(v):
            return parse_size(v) if isinstance(v, str) else v

        if max_batch < 1 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1")
        if kv_cache not in ("slots", "paged") or isinstance(block_size, bool) or not isinstance(block_size, int) \
                or block_size < 1:  # before the load (they were checked after it, by the scheduler)
            raise ValueError(f"kv_cache must be 'slots' or 'paged' (got {kv_cache!r}) and block_size an integer >= 1 "
                             f"(got {block_size!r})")
        opts = EngineOptions(device=device, dtype=dtype, kernels=kernels, vram_budget=size(vram_budget),
                             host_budget=size(host_budget), batch=max_batch,
                             max_context=max_context or EngineOptions.max_context, max_context_auto=max_context is None,
                             prefill_chunk=prefill_chunk or EngineOptions.prefill_chunk,
                             prefill_chunk_auto=prefill_chunk is None)
        model_dir, is_default = resolve_or_default(None if model is None else str(model))
        files = open_model(model_dir)
        fit_context(files.cfg, opts)
        self.engine: Engine = load_engine(None, opts, quiet=True, resolved=(files, is_default))[0]
        self.tokenizer = self.engine.tokenizer
        try:
            self.scheduler: Scheduler | None = Scheduler(self.engine, max_waiting=0, kv_cache=kv_cache,
                                                         block_size=block_size)
        except BaseException:  # e.g. the paged cache's memory: the loaded engine is released, not left to the GC
            self.engine.close()
            raise
        self._lock = threading.Lock()  # one batch at a time: calls from other threads wait their turn

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete raw prompts (text, or token ids); outputs in prompt order."""
        prompts = _prompt_list(prompts)
        items = [(p, self.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompts]
        return self._run(items, params, use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Reply to conversations ([{"role", "content"}, ...]) rendered with the model's chat template.
        ``tools`` (OpenAI's function definitions) are offered to the model as the server offers them, with
        OpenAI's ``tool_choice`` (engine.serving.tools); each output's ``tool_calls`` then holds the calls its
        text makes. ``chat_template_kwargs``: extra template variables, e.g. Qwen3's
        ``{"enable_thinking": False}``."""
        conversations = _conversation_list(conversations)
        extra = template_kwargs(chat_template_kwargs)
        offered, forced = check_tools(tools or [], tool_choice, self.tokenizer.chat_template)
        if forced:
            plist = params if isinstance(params, list) else [params or SamplingParams()] * len(conversations)
            params = [dataclasses.replace(p, tool_call=forced) if isinstance(p, SamplingParams) else p for p in plist]
        items = []
        for conv in conversations:
            conv = [{**m, "tool_calls": template_tool_calls(m["tool_calls"])} if m.get("tool_calls") else m
                    for m in conv]
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, **extra,
                                                      **({"tools": tools} if offered else {}))
            items.append((text, self.tokenizer.encode(text, add_special_tokens=False)))
        out = self._run(items, params, use_tqdm)
        for o in (o for r in out for o in r.outputs) if offered else ():
            o.tool_calls = parse_tool_calls(o.text)[1]
        return out

    def _run(self, items: list[tuple[str | None, list[int]]], params, use_tqdm: bool) -> list[RequestOutput]:
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(items)
        if len(plist) != len(items):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(items)} prompts; give one, or one each")
        if bad := next((p for p in plist if not isinstance(p, SamplingParams)), None):
            raise TypeError(f"params must be engine.SamplingParams (or a list of them), got {type(bad).__name__}: "
                            "e.g. SamplingParams(max_tokens=64, temperature=0.7)")
        with self._lock:  # one batch at a time: two threads' calls had stepped each other's sequences, failing both
            if self.scheduler is None:
                raise RuntimeError("this LLM is closed: make a new one")
            return self._run_locked(items, plist, use_tqdm)

    def _run_locked(self, items: list[tuple[str | None, list[int]]], plist: list[SamplingParams],
                    use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        sched, groups = self.scheduler, []
        for k, ((_, ids), p) in enumerate(zip(items, plist)):  # every prompt checked before any work
            try:
                groups.append([Sequence(ids, p, self.tokenizer, index=i) for i in range(p.n)])
                sched.check(ids, p)
            except ValueError as e:
                raise ValueError(f"prompt {k}: {e}" if len(items) > 1 else str(e)) from None
        sched.max_waiting = sum(map(len, groups))
        bar = tqdm(total=len(groups), desc="generating", unit="prompt", disable=not (use_tqdm and groups), leave=False)
        left = {id(g): len(g) for g in groups}
        owner = {s.seq_id: g for g in groups for s in g}
        try:
            for s in (s for g in groups for s in g):
                sched.add(s)
            while sched.has_work():
                for out in sched.step():
                    if out.finished:
                        g = owner[out.seq.seq_id]
                        left[id(g)] -= 1
                        bar.update(left[id(g)] == 0)
        except BaseException:  # Ctrl-C, or an error (out of memory): the LLM stays usable for the next call
            for s in list(sched.running) + list(sched.waiting):
                sched.abort(s.seq_id)
            raise
        finally:
            bar.close()
        return [RequestOutput(text, ids, [CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason,
                                                           s.logprobs if s.params.logprobs is not None else None,
                                                           s.error)
                                          for s in g]) for (text, ids), g in zip(items, groups)]

    def close(self) -> None:
        """Release the engine's weight sources and allocator cap, and drop the scheduler (its KV cache), whose
        reference cycle with its runner had kept the engine's memory until a garbage collection; later calls are an
        error. Idempotent."""
        if self.scheduler is not None:
            self.scheduler.runner.on_queued = None
            self.scheduler = None
        self.engine.cache = self.engine.graph = self.engine.model.prompt_graphs = None
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prompt_list(prompts) -> list:
    """``generate``'s prompts as a list of strings and token-id lists; TypeError saying what is accepted."""
    def ids(p) -> bool:
        return isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(prompts, str) or (ids(prompts) and prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) or ids(p) for p in prompts):
        return list(prompts)
    held = " holding other types" if isinstance(prompts, (list, tuple)) else ""
    raise TypeError("prompts must be a string, a list of token ids, or a list of either (a batch); got "
                    f"{type(prompts).__name__}{held}")


def _conversation_list(conversations) -> list[list[dict]]:
    """``chat``'s conversations as a list of message lists; TypeError saying what is accepted."""
    def conversation(c) -> bool:
        return isinstance(c, (list, tuple)) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                    for m in c)
    if conversation(conversations) and conversations:
        return [list(conversations)]
    if isinstance(conversations, (list, tuple)) and all(conversation(c) for c in conversations):
        return [list(c) for c in conversations]
    raise TypeError("conversations must be a list of messages like {'role': 'user', 'content': 'Hi'}, or a list of "
                    f"such lists (a batch); got {type(conversations).__name__}")
