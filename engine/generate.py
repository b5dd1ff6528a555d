"""Generation: batched prefill (right-padded, chunked) then decode with the KV cache.

Each sequence keeps its own length; padding positions are written to the cache but
lie beyond the sequence's length, so no pad token is ever attended. Finished
sequences stop advancing while the others go on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from engine import ahead
from engine.detok import IncrementalDetokenizer, StopStringMatcher
from engine.engine import Engine
from engine.lane_guard import guard_for, shrink_host_lane
from engine.sampling import Sampler, SamplingParams, row_seeds


@dataclass
class Generation:
    """Tokens, text and timing of one ``generate`` call (one entry per prompt)."""

    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stats: dict = field(default_factory=dict)


def _check_prompts(engine: Engine, prompts: list[list[int]]) -> None:
    if not prompts or len(prompts) > engine.opts.batch:
        raise ValueError(f"got {len(prompts)} prompts; this engine was set up for 1..{engine.opts.batch} "
                         "(raise --batch)")
    for p in prompts:
        if not p:
            raise ValueError("empty prompt: give at least one token")
        if len(p) >= engine.opts.max_context:
            raise ValueError(f"prompt has {len(p)} tokens but the context holds {engine.opts.max_context}: "
                             "shorten the prompt or raise --max-context")
        if max(p) >= engine.cfg.vocab_size or min(p) < 0:
            raise ValueError(f"prompt token id out of range [0, {engine.cfg.vocab_size})")


def prefill(engine: Engine, prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts through the model (layer-major, in chunks of ``--prefill-chunk`` tokens);
    return fp32 logits [B, V] of each last token."""
    b, lens = len(prompts), [len(p) for p in prompts]
    ids = torch.zeros((b, max(lens)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    shape = ahead.prefill_key(engine.opts.prefill_chunk, lens)
    chunk = shape[0]
    ids = ids.to(engine.device)
    engine.prefill_compile_s = 0.0
    if shape not in engine.prefill_shapes:  # a new shape: its kernels compiled in parallel
        engine.prefill_shapes.add(shape)
        t0 = time.perf_counter()
        ahead.prefill(engine.model, ids, lens, chunk, engine.cache, engine.ops.prompt_chunk)
        engine.prefill_compile_s = time.perf_counter() - t0
    last = engine.model.prefill(ids, lens, chunk, engine.cache, engine.ops.prompt_chunk)
    engine.cache.lengths[:b] = lens
    return last


class NonFiniteLogits(RuntimeError):
    """The model's logits came out NaN or inf: nothing sampled from them means anything."""


def nonfinite_message(dtype: torch.dtype, generated: int, prompt: int | None = None) -> str:
    """What to tell the user when a row of logits is not finite (``prompt``: which one, when several)."""
    name = str(dtype).removeprefix("torch.")
    hint = ": fp16 overflows where bf16 does not, so try --dtype bf16" if dtype == torch.float16 else ""
    which = f" for prompt {prompt}" if prompt is not None else ""
    return f"the model produced non-finite logits (NaN or inf) in {name} after {generated} generated tokens{which}{hint}"


def generate(engine: Engine, prompts: list[list[int]], params: SamplingParams | None = None,
             max_new_tokens: int = 128, stop_strings: list[str] | None = None,
             on_text: Callable[[int, str], None] | None = None, seeds: list[int] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt (token ids); Ctrl-C stops cleanly. With a seed, each row
    draws from its own generator, seeded with ``seeds[i]`` (default: ``row_seeds(prompts, params.seed)``), so
    its tokens do not depend on the rest of the batch."""
    params = params or SamplingParams()
    _check_prompts(engine, prompts)
    dev, b, cap = engine.device, len(prompts), engine.opts.max_context
    sampler = _row_sampler(engine, params, prompts, seeds)
    eos = engine.tokenizer.eos_ids
    history = _penalty_history(params, prompts, max_new_tokens, dev)
    out: list[list[int]] = [[] for _ in range(b)]
    # special tokens (a chat template's <|im_start|>) are not text: printed, a chat turn fed them back as control
    # tokens (the server skipped them already)
    detok = [IncrementalDetokenizer(engine.tokenizer, skip_special_tokens=True, context_ids=p) for p in prompts]
    stops = [StopStringMatcher(stop_strings or []) for _ in range(b)]
    texts, reasons = [""] * b, [""] * b
    engine.cache.reset()
    _sync(dev)
    t0, crossed = time.perf_counter(), [engine.weights.stream.streamed_bytes]
    moved = [(engine.model.state_host_bytes, engine.model.parked_passes)]
    try:
        logits = prefill(engine, prompts)
        crossed.append(engine.weights.stream.streamed_bytes)
        moved.append((engine.model.state_host_bytes, engine.model.parked_passes))
        pos = [len(p) for p in prompts]
        t1, last, guard = None, None, guard_for(engine)
        for step in range(max_new_tokens):
            tok, toks = _next_tokens(engine, sampler, logits, history, reasons, out)
            now = time.perf_counter()
            t1 = t1 or now
            if guard is not None and last is not None and guard.observe(now - last):  # the lane loses:
                guard = shrink_host_lane(engine, guard.measured, guard.window())  # fewer host layers, or none
            last = now
            for i in range(b):
                if not reasons[i]:
                    _emit(i, toks[i], out, detok, stops, texts, reasons, eos, on_text)
                    reasons[i] = reasons[i] or ("length" if pos[i] + 1 >= cap else "")
            if all(reasons) or step == max_new_tokens - 1:
                break
            if history is not None:
                history[torch.arange(b, device=dev), torch.tensor(pos, device=dev)] = tok
            start = [min(p, cap - 1) for p in pos]
            pos = [p + (0 if reasons[i] else 1) for i, p in enumerate(pos)]
            logits = decode_step(engine, tok, start)
    except KeyboardInterrupt:
        reasons = [r or "interrupted" for r in reasons]
    _sync(dev)
    t2 = time.perf_counter()
    for i in range(b):
        if reasons[i] != "stop":
            _flush(i, detok, stops, texts, on_text)
        reasons[i] = reasons[i] or "max_new_tokens"
    crossed.append(engine.weights.stream.streamed_bytes)
    return Generation(out, texts, reasons, _stats(engine, prompts, out, (t0, t1 or t2, t2), crossed, moved))


RowSampler = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (logits [B, V], history) -> tokens [B]


def _row_sampler(engine: Engine, params: SamplingParams, prompts: list[list[int]],
                 seeds: list[int] | None) -> RowSampler:
    """One sampler for the whole batch, or, when seeded (and not greedy), one per row with its own seed."""
    vocab, dev, triton = engine.cfg.vocab_size, engine.device, engine.ops.name == "triton"
    if seeds is None and params.seed is not None:
        seeds = row_seeds(prompts, params.seed)
    if seeds is None or params.greedy:
        return Sampler(params, vocab, dev, use_triton=triton)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one each")
    rows = [Sampler(dataclasses.replace(params, seed=s), vocab, dev, use_triton=triton) for s in seeds]

    def sample(logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([r(logits[i:i + 1], None if history is None else history[i:i + 1])
                          for i, r in enumerate(rows)])
    return sample


def _next_tokens(engine: Engine, sampler: RowSampler, logits: torch.Tensor, history: torch.Tensor | None,
                 reasons: list[str], out: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """The step's sampled tokens, on the device and as ints (the one host sync per step); NonFiniteLogits when
    an unfinished row's logits hold a NaN or an inf (finished rows are ignored)."""
    tok = sampler(logits, history)
    bad = ~torch.isfinite(logits[:, : engine.cfg.vocab_size]).all(-1)
    toks, bads = torch.stack([tok, bad.to(tok.dtype)]).tolist()
    i = next((i for i, x in enumerate(bads) if x and not reasons[i]), None)
    if i is not None:
        raise NonFiniteLogits(nonfinite_message(engine.dtype, len(out[i]), i if len(out) > 1 else None))
    return tok, toks


def _penalty_history(params: SamplingParams, prompts: list[list[int]], max_new_tokens: int,
                     dev: torch.device) -> torch.Tensor | None:
    """Prompt + generated ids per row (-1 beyond), which only the repetition penalty reads; None without it."""
    if params.repetition_penalty == 1.0:
        return None
    history = torch.full((len(prompts), max(map(len, prompts)) + max_new_tokens), -1, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        history[i, : len(p)] = torch.tensor(p, device=dev)
    return history


def decode_step(engine: Engine, tok: torch.Tensor, start: list[int]) -> torch.Tensor:
    """One decode step for tokens tok [B] at positions ``start``; graph replay when captured."""
    b, dev = tok.shape[0], engine.device
    start_t = torch.tensor(start, dtype=torch.int32, device=dev)
    if engine.graph is not None and engine.graph.batch == b:
        return engine.graph(tok, start_t)
    return engine.model.forward(tok.view(b, 1), start_t, torch.ones(b, dtype=torch.int32, device=dev),
                                engine.cache, max_len=max(start) + 1)


def _emit(i, token, out, detok, stops, texts, reasons, eos, on_text) -> None:
    if token in eos:
        reasons[i] = "eos"
        return
    out[i].append(token)
    safe, stopped = stops[i].push(detok[i].push(token))
    texts[i] += safe
    if safe and on_text:
        on_text(i, safe)
    if stopped:
        reasons[i] = "stop"


def _flush(i, detok, stops, texts, on_text) -> None:
    safe, _ = stops[i].push(detok[i].flush())
    safe += stops[i].flush()
    texts[i] += safe
    if safe and on_text:
        on_text(i, safe)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _stats(engine: Engine, prompts, out, times: tuple[float, float, float], crossed: list[int],
           moved: list[tuple[int, int]]) -> dict:
    """Token counts, rates and the bytes streamed to the device (``crossed``: the streamer's byte
    counter before the prefill, after it and at the end, when the run got that far; ``moved``: the
    model's (prompt-state bytes copied to and from host memory, parked passes), before the prefill and
    after it)."""
    t0, t1, t2 = times
    n_prompt = sum(map(len, prompts))
    n_gen = sum(map(len, out))
    decode_steps = max(map(len, out)) - 1 if out and max(map(len, out)) > 1 else 0
    stats = {
        "prompt_tokens": n_prompt, "generated_tokens": n_gen, "batch": len(prompts),
        "prefill_s": t1 - t0, "decode_s": t2 - t1,
        "prefill_tok_s": n_prompt / (t1 - t0) if t1 > t0 else 0.0,
        "decode_tok_s": (n_gen - len(prompts)) / (t2 - t1) if t2 > t1 and decode_steps else 0.0,
        "decode_step_s": (t2 - t1) / decode_steps if decode_steps else 0.0,
        "prefill_streamed_bytes": crossed[1] - crossed[0] if len(crossed) > 1 else 0,
        "prefill_state_host_bytes": moved[1][0] - moved[0][0] if len(moved) > 1 else 0,
        # the prompt states waited in the KV cache's unreached positions (engine.state_parking), not the host's
        "prefill_states_parked": len(moved) > 1 and moved[1][1] > moved[0][1],
        "decode_streamed_bytes_per_step": (crossed[2] - crossed[1]) // decode_steps if decode_steps and
        len(crossed) > 2 else 0,
        "host_rss_bytes": psutil.Process().memory_info().rss,
        "startup_s": dict(engine.startup_s), "prefill_compile_s": engine.prefill_compile_s,
    }
    if engine.device.type == "cuda":
        stats["peak_vram_bytes"] = torch.cuda.max_memory_allocated(engine.device)
    return stats
