"""The peer of ``tools.bench_serve``: transformers + accelerate offload serving the requests one by one.

What a user without layerstream would do with a model larger than the GPU budget: load it with
``device_map="auto"`` and a ``max_memory`` budget (``tools.hf_offload``) and call ``generate`` for
each request in turn (greedy, exactly its drawn number of new tokens). A streamer timestamps every
new token (TTFT, inter-token gaps). The run stops by itself at a time limit, mid-request if need be:
its row says how many requests and tokens it finished in the time it ran, and its rates are those
measured over that time, never extrapolated to the whole request list.
"""

from __future__ import annotations

import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tools.bench_serve import summarize
from tools.hf_offload import gpu_modules, load_offloaded


class _TokenClock(BaseStreamer):
    """Records when each new token is produced (``generate`` first puts the prompt, then each token)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.extend([time.perf_counter()] * value.numel())

    def end(self) -> None:
        pass


class _Deadline(StoppingCriteria):
    """Stops generation once ``perf_counter`` passes ``at``."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = time.perf_counter() >= self.at
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _serve_one(model, prompt: list[int], n: int, deadline: float) -> dict:
    # accelerate's hooks move each module's inputs to where it computes; the first one is GPU 0
    ids = torch.tensor([prompt], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=clock, stopping_criteria=StoppingCriteriaList([_Deadline(deadline)]),
                       pad_token_id=model.config.eos_token_id)
    return {"t0": t0, "chunks": clock.times, "tokens": len(clock.times), "wanted": n}


def run_peer(model_dir: str, budget: int | None, jobs: list[tuple[list[int], int]], time_limit: float) -> dict:
    """Serve ``jobs`` (prompt ids, new tokens) one by one within ``time_limit`` seconds (loading not
    counted); a row shaped like ``tools.bench_serve.run_level``'s, labelled ``config: peer``."""
    model, load_s = load_offloaded(model_dir, budget)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    results: list[dict] = []
    t_start = time.perf_counter()
    deadline = t_start + time_limit
    for prompt, n in jobs:
        if time.perf_counter() >= deadline:
            break
        results.append(_serve_one(model, prompt, n, deadline))
    wall = time.perf_counter() - t_start
    row = summarize(results, [], wall, None)
    row.update(config="peer", engine="transformers+accelerate", clients=1, budget_bytes=budget, load_s=load_s,
               time_limit_s=time_limit, requests_total=len(jobs),
               stopped_by_time_limit=len(results) < len(jobs) or any(r["tokens"] < r["wanted"] for r in results),
               gpu_modules=gpu_modules(model),
               peak_vram_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row
