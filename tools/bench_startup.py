"""Start-up benchmark: wall time of whole ``python -m engine.run`` processes, three in a row.

Each process loads the model, tunes (or looks up) its kernels, captures the decode graphs,
prefills a short prompt and decodes a few tokens. The three runs share a fresh cache directory:

- ``first``:     empty tuning cache (on a fresh machine also Triton's compile cache is empty);
- ``cached``:    the tuning cache the first run wrote (kernels/tuning_cache.py), compiles cached;
- ``no-cache``:  ``LAYERSTREAM_TUNING_CACHE=0``: every shape timed again, compiles cached.

``no-cache - cached`` is what the tuning cache saves per start. Greedy tokens of ``first`` and
``cached`` must agree (the same configs run). Writes one JSON file.

``--triton-cache fresh`` gives the runs a new, empty Triton compile cache (``TRITON_CACHE_DIR``), so
``first`` is what a fresh machine sees even where Triton's cache is warm; ``--prompt-words N`` sends a
long raw prompt (N words, about 2N tokens of the synthetic tokenizer) instead of "Hello".

    python -m tools.bench_startup --model DIR --vram-budget 6GB --out startup.json
    python -m tools.bench_startup --model DIR --runs first,cached --triton-cache fresh --prompt-words 8000 \
        --max-context 20000 --out startup16k.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
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
    p.add_argument("--runs", default="first,cached,no-cache", help="which of first,cached,no-cache to run, in order")
    p.add_argument("--triton-cache", choices=["inherit", "fresh"], default="inherit",
                   help="fresh: an empty TRITON_CACHE_DIR shared by these runs (a fresh machine's first run)")
    p.add_argument("--prompt-words", type=int, default=0, help="a raw prompt of this many words instead of 'Hello'")
    p.add_argument("--max-context", type=int, help="passed to engine.run (long prompts need it)")
    p.add_argument("--profile-dir", help="record each run with py-spy (every thread, waits included) into "
                   "DIR/<run>.speedscope.json, for tools.profile_summary; profiled runs are a little slower")
    p.add_argument("--out", default="startup.json")
    return p


def run_once(args: argparse.Namespace, cache_dir: str, extra_env: dict, name: str = "run") -> dict:
    """One CLI process; its wall time, exit code, tokens and stats."""
    prompt = ["--no-chat", "--prompt", " ".join(["hello"] * args.prompt_words)] if args.prompt_words else \
        ["--prompt", "Hello"]
    cmd = [sys.executable, "-m", "engine.run", "--model", args.model, "--vram-budget", args.vram_budget,
           *prompt, "--max-new-tokens", str(args.max_new_tokens), "--json"]
    if args.max_context:
        cmd += ["--max-context", str(args.max_context)]
    if args.profile_dir:
        out = Path(args.profile_dir, f"{name}.speedscope.json")
        cmd = [shutil.which("py-spy") or "py-spy", "record", "--format", "speedscope", "--idle",
               "--rate", "100", "--output", str(out), "--", *cmd]
    env = {**os.environ, "LAYERSTREAM_CACHE": cache_dir, **extra_env}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          cwd=ROOT)
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "rc": proc.returncode, "env": extra_env}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-2000:]
        return res
    out = json.loads(next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")))  # py-spy adds lines
    res.update(token_ids=out["token_ids"], stats=out["stats"])
    return res


def summarize(results: dict) -> dict:
    """first / cached wall ratio, same tokens, and what the tuning cache saves (when those runs ran)."""
    if not {"first", "cached"} <= set(results):
        return {}
    first, cached = results["first"], results["cached"]
    summary = {"first_over_cached": first["wall_s"] / cached["wall_s"],
               "same_tokens": first["token_ids"] == cached["token_ids"]}
    if "no-cache" in results:
        summary["saved_s"] = results["no-cache"]["wall_s"] - cached["wall_s"]
        print(f"tuning cache saves {summary['saved_s']:.1f} s per start")
    print(f"first / cached: {summary['first_over_cached']:.2f}x; same tokens: {summary['same_tokens']}")
    return summary


def _phases(stats: dict) -> str:
    """``, prefill 5.00 s (compile 4.1)`` and the engine's start-up phases (engine.run --json's startup_s)."""
    out = f", prefill {stats['prefill_s']:.2f} s"
    if stats.get("prefill_compile_s", 0) >= 0.005:
        out += f" (compile ahead {stats['prefill_compile_s']:.2f})"
    phases = stats.get("startup_s") or {}
    return out + ("; start: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) if phases else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        print(f"error: {args.model} has no config.json: pass a model directory (tools.synth makes one)",
              file=sys.stderr)
        return 2
    runs = dict(RUNS)
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not wanted or any(r not in runs for r in wanted):
        print(f"error: --runs takes names from {','.join(runs)}, got {args.runs!r}", file=sys.stderr)
        return 2
    if args.profile_dir:
        if shutil.which("py-spy") is None:
            print("error: --profile-dir needs py-spy on the PATH: pip install py-spy", file=sys.stderr)
            return 2
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="layerstream-startup-")
    fresh = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-fresh-")} if args.triton_cache == "fresh" else {}
    results = {}
    for name in wanted:
        r = results[name] = run_once(args, cache_dir, {**runs[name], **fresh}, name)
        print(f"{name:>9}: {r['wall_s']:6.1f} s wall, rc {r['rc']}" + (_phases(r["stats"]) if "stats" in r else ""),
              flush=True)
    ok = all(r["rc"] == 0 for r in results.values())
    summary = summarize(results) if ok else {}
    tuning = sorted(p.name for p in Path(cache_dir, "tuning").glob("*.json"))
    payload = {"model": args.model, "vram_budget": args.vram_budget, "cache_dir": cache_dir,
               "prompt_words": args.prompt_words, "triton_cache": fresh.get("TRITON_CACHE_DIR", "inherited"),
               "tuning_files": tuning, "runs": results, "summary": summary}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
