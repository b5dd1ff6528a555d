"""A warmed-up server's first requests, one at a time: what each one's first pass compiles, tunes and takes.

    python bench/first_request_probe.py --model DIR [--vram-budget 6GiB --max-batch 32 --max-context 2304]
        [--lengths 1857,1857,1024,1025,2048,500] [--out probe.json]

The server's scheduler (``engine.LLM``) is warmed up as ``engine.serve`` does (``warm_up``); then each
prompt (random tokens, a fresh first token so nothing is reused) runs alone with ``max_tokens=1``. Each
line: the call's time, the Triton specialisations compiled during it (``jit_cache_hook``) and the tuning
keys added to the tuned kernels' tables. On the H200 at 6 GiB the 1-client level's request (1857 tokens)
took 781 ms where 4 clients' 4946 tokens took 393 ms right after it (session 18, call 1).
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.probe_server import server_parser, sync  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.serving.warmup import warm_up  # noqa: E402

_TUNERS = ("gemm", "gemv", "attention_prefill", "attention_decode", "rope")


def _tuned() -> dict[str, set]:
    return {n: set(importlib.import_module(f"kernels.{n}")._TUNED) for n in _TUNERS}


def main() -> None:
    p = server_parser(__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1857,1857,1024,1025,2048,500")
    p.add_argument("--out")
    a = p.parse_args()
    import triton

    llm = LLM(a.model, vram_budget=a.vram_budget, max_batch=a.max_batch, max_context=a.max_context)
    t = time.perf_counter()
    report = warm_up(llm.scheduler)
    print(f"{report.summary()} ({time.perf_counter() - t:.1f} s); chunk {llm.engine.opts.prefill_chunk}")
    compiled: list[str] = []
    triton.knobs.runtime.jit_cache_hook = lambda **k: compiled.append(str(k.get("repr", k))[:160])
    gen, vocab = torch.Generator().manual_seed(0), llm.engine.cfg.vocab_size
    rows = []
    for i, n in enumerate(int(x) for x in a.lengths.split(",")):
        ids = [(1000 + i) % vocab] + torch.randint(0, vocab, (n - 1,), generator=gen).tolist()
        before, compiled[:] = _tuned(), []
        sync()
        t = time.perf_counter()
        llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        sync()
        ms = (time.perf_counter() - t) * 1e3
        new = {k: sorted(map(str, v - before[k])) for k, v in _tuned().items() if v - before[k]}
        rows.append({"tokens": n, "ms": ms, "compiled": list(compiled), "tuned": new})
        print(f"{n:6d} tokens {ms:8.1f} ms  compiled {len(compiled)}  tuned {new}")
        for c in compiled[:6]:
            print("     ", c)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
