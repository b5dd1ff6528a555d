"""Whether o_proj's x is rounded in the decode attention's epilogue in a real engine (issue 15, session_run.sh Q).

``LAYERSTREAM_ROUND_IN_ATTENTION=1`` only takes the fused path (kernels/attention_qgemv.py) where o_proj's tuned GEMV
is the int8-x one; otherwise the decoder silently runs the attention, then the GEMV. Before the A/B of the two is
read, this loads the engine with the flag on, counts the fused calls that ran (``attention_qgemv`` returning a
result) and those that declined, during the load (warm-up steps and the decode graph's capture: what every replayed
step runs) and during one greedy generation, and prints the decode tok/s.

    PYTHONPATH=. LAYERSTREAM_ROUND_IN_ATTENTION=1 python bench/round_check.py --model /tmp/q7b-awq --vram-budget 6GiB
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention_qgemv  # noqa: E402

COUNTS = {"fused": 0, "declined": 0}


def _counted(real):
    def call(*args, **kwargs):
        out = real(*args, **kwargs)
        COUNTS["fused" if out is not None else "declined"] += 1
        return out
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--vram-budget", default="6GiB")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--kernels", default="auto", help="triton with --dtype bf16 on the CPU (TRITON_INTERPRET=1): a smoke run")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args()
    if os.environ.get("LAYERSTREAM_ROUND_IN_ATTENTION") != "1":
        raise SystemExit("error: set LAYERSTREAM_ROUND_IN_ATTENTION=1 (this checks the path it turns on)")
    attention_qgemv.attention_qgemv = _counted(attention_qgemv.attention_qgemv)  # before TritonOps binds it
    import torch

    from engine.engine import Engine, EngineOptions
    from engine.generate import generate
    from engine.sampling import SamplingParams
    from memory.units import parse_size

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    eng = Engine(Path(a.model), EngineOptions(vram_budget=parse_size(a.vram_budget), batch=1, kernels=a.kernels,
                                              dtype=a.dtype))
    print(f"load (warm-up steps, graph capture): fused {COUNTS['fused']}, declined {COUNTS['declined']}; "
          f"graph {'on' if eng.graph is not None else 'off'}", flush=True)
    COUNTS.update(fused=0, declined=0)
    prompt = [[(17 * i) % eng.cfg.vocab_size for i in range(1, 65)]]
    sync()
    t = time.perf_counter()
    out = generate(eng, prompt, SamplingParams(), max_new_tokens=a.tokens)
    sync()
    print(f"generation ({len(out.token_ids[0])} tokens, {time.perf_counter() - t:.2f} s incl. prefill): fused "
          f"{COUNTS['fused']}, declined {COUNTS['declined']} (0 and 0 with every step a graph replay)")
    eng.close()


if __name__ == "__main__":
    main()
