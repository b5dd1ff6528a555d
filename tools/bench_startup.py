"""Start-up benchmark: wall time of whole ``python -m engine.run`` processes, three in a row.

Each process loads the model, tunes (or looks up) its kernels, captures the decode graphs,
prefills a short prompt and decodes a few tokens. The three runs share a fresh cache directory:

- ``first``:     empty tuning cache (on a fresh machine also Triton's compile cache is empty);
- ``cached``:    the tuning cache the first run wrote (kernels/tuning_cache.py), compiles cached;
- ``no-cache``:  ``LAYERSTREAM_TUNING_CACHE=0``: every shape timed again, compiles cached.

``no-cache - cached`` is what the tuning cache saves per start. Greedy tokens of ``first`` and
``cached`` must agree (the same configs run). Writes one JSON file.

    python -m tools.bench_startup --model DIR --vram-budget 6GB --out startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # engine.run is importable from here
ON, OFF = {"LAYERSTREAM_TUNING_CACHE": "1"}, {"LAYERSTREAM_TUNING_CACHE": "0"}
RUNS = (("first", ON), ("cached", ON), ("no-cache", OFF))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--vram-budget", default="6GB")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--cache-dir", help="LAYERSTREAM_CACHE for the runs (default: a new temporary directory)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per process")
    p.add_argument("--out", default="startup.json")
    return p


def run_once(args: argparse.Namespace, cache_dir: str, extra_env: dict) -> dict:
    """One CLI process; its wall time, exit code, tokens and stats."""
    cmd = [sys.executable, "-m", "engine.run", "--model", args.model, "--vram-budget", args.vram_budget,
           "--prompt", "Hello", "--max-new-tokens", str(args.max_new_tokens), "--json"]
    env = {**os.environ, "LAYERSTREAM_CACHE": cache_dir, **extra_env}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          cwd=ROOT)
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "rc": proc.returncode, "env": extra_env}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-2000:]
        return res
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(token_ids=out["token_ids"], stats=out["stats"])
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        print(f"error: {args.model} has no config.json: pass a model directory (tools.synth makes one)",
              file=sys.stderr)
        return 2
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="layerstream-startup-")
    results = {}
    for name, env in RUNS:
        r = results[name] = run_once(args, cache_dir, env)
        print(f"{name:>9}: {r['wall_s']:6.1f} s wall, rc {r['rc']}"
              + (f", prefill {r['stats']['prefill_s']:.2f} s" if "stats" in r else ""), flush=True)
    ok = all(r["rc"] == 0 for r in results.values())
    summary = {}
    if ok:
        summary = {"saved_s": results["no-cache"]["wall_s"] - results["cached"]["wall_s"],
                   "same_tokens": results["first"]["token_ids"] == results["cached"]["token_ids"]}
        print(f"tuning cache saves {summary['saved_s']:.1f} s per start; first and cached runs give the same "
              f"tokens: {summary['same_tokens']}")
    tuning = sorted(p.name for p in Path(cache_dir, "tuning").glob("*.json"))
    payload = {"model": args.model, "vram_budget": args.vram_budget, "cache_dir": cache_dir,
               "tuning_files": tuning, "runs": results, "summary": summary}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
