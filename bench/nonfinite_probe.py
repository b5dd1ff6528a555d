"""Which serving pass first gives non-finite logits (NaN / inf), in process, warm-up then a burst.

    python bench/nonfinite_probe.py --model DIR [--dtype auto] [--out nonfinite.json]

The synthetic 7B AWQ at 6 GiB (fp16, the checkpoint's dtype) served no request on the H200 (session 20):
the warm-up's sampled step hit ``torch.multinomial``'s device assert on non-finite probabilities, and the
CUDA context was lost for every step after it. This wraps the runner's sampling: each pass's logits rows
are checked before sampling (one sync, a probe only) and the first bad passes are printed with their
sequences (slot, prompt length, positions computed); bad rows are zeroed so the run goes on.
The cause, found afterwards on the CPU (torch ops, fp16): the synthesizer's uniform int4 codes sat half a
step below their zero point on average, and that common offset grew through the residual stream past
fp16's range (engine/synth/quant.py now centres them). Run this after changing kernels or the synthesizer.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.probe_server import server_parser  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.serving import warmup  # noqa: E402
from engine.serving.scheduler import QueueFull  # noqa: E402
from engine.serving.sequence import Sequence  # noqa: E402
from tools.bench_serve import VOCAB, make_jobs  # noqa: E402


def watch(llm: LLM, found: list[dict], where: list[str]) -> None:
    """Check every pass's logits before the runner samples them."""
    runner = llm.scheduler.runner
    real = runner.sample

    def checked(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        bad = (~torch.isfinite(logits)).any(-1)
        rows = bad.nonzero().flatten().tolist()
        if rows:
            found.append({"where": where[0], "rows": rows, "logits_rows": logits.shape[0],
                          "seqs": [(s.slot, len(s.prompt_ids), s.num_computed) for s in seqs],
                          "nan": int(torch.isnan(logits).sum()), "inf": int(torch.isinf(logits).sum())})
            if len(found) <= 8:
                print("non-finite:", json.dumps(found[-1]), flush=True)
            logits = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
        return real(logits, seqs)

    runner.sample = checked


def main() -> None:
    p = server_parser(__doc__.split("\n")[0])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out")
    a = p.parse_args()
    llm = LLM(a.model, vram_budget=a.vram_budget, max_batch=a.max_batch, max_context=a.max_context, dtype=a.dtype)
    print("dtype", llm.engine.dtype, flush=True)
    found: list[dict] = []
    where = ["load"]
    watch(llm, found, where)
    real_run = warmup._run

    def run(scheduler, step, report):
        where[0] = f"warm-up {step}"
        return real_run(scheduler, step, report)

    warmup._run = run
    t = time.perf_counter()
    print(f"{warmup.warm_up(llm.scheduler).summary()} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"warm-up: {len(found)} passes with non-finite logits", flush=True)
    n_warm = len(found)
    where[0] = "burst"
    jobs = [job for client in make_jobs(16, 1, (128, 2048), (2, 2), VOCAB, 2) for job in client]
    vocab = llm.engine.cfg.vocab_size
    seqs = [Sequence([i % vocab for i in ids], SamplingParams(max_tokens=8, temperature=0.0), llm.tokenizer) for ids, _ in jobs]
    for s in seqs:
        while True:
            try:
                llm.scheduler.add(s)
                break
            except QueueFull:
                llm.scheduler.step()
    while llm.scheduler.has_work():
        llm.scheduler.step()
    print(f"burst (16 prompts, 8 tokens each): {len(found) - n_warm} passes with non-finite logits", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
