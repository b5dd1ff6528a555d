"""Device probe: what a first call costs on a cold Triton cache (compiling the tuning candidates).

Sets a fresh TRITON_CACHE_DIR, then times first calls: the GEMV at a new row bucket tuned and
untuned (kernels.tuning.untuned), and the prefill GEMM's candidates compiled one after the other
(no bias) or from 16 threads (with bias: the same configs, another compile key, also cold).
    python bench/probe_compile.py --out probe_compile.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
os.environ["LAYERSTREAM_TUNING_CACHE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

from kernels import gemm as gm  # noqa: E402
from kernels.gemv import gemv  # noqa: E402
from kernels.tuning import untuned  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="probe_compile.json")
    args = p.parse_args()
    dev, bf = "cuda", torch.bfloat16
    w, b = torch.randn(4608, 3584, device=dev, dtype=bf), torch.randn(4608, device=dev, dtype=bf)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "async_compile_mode": hasattr(triton, "AsyncCompileMode")}
    res["gemv_bucket32_tuned_s"] = timed(lambda: gemv(torch.randn(20, 3584, device=dev, dtype=bf), w, b))
    with untuned():
        res["gemv_bucket64_untuned_s"] = timed(lambda: gemv(torch.randn(40, 3584, device=dev, dtype=bf), w, b))
    x = torch.randn(200, 3584, device=dev, dtype=bf)
    out = torch.empty(200, 4608, device=dev, dtype=bf)
    cands = gm._candidates(x, gm.gemm_tma.device_ok(x))
    res["gemm_candidates"] = len(cands)

    def run(cfg, bias):
        try:
            gm._launch(cfg, x, w, bias, out)
        except Exception as e:  # noqa: BLE001
            return repr(e)[:80]
        return None

    res["gemm_sequential_s"] = timed(lambda: [run(c, None) for c in cands])
    with ThreadPoolExecutor(16) as pool:
        res["gemm_threads16_s"] = timed(lambda: list(pool.map(lambda c: run(c, b), cands)))
    res["gemm_errors"] = [e for e in (run(c, b) for c in cands) if e]
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
