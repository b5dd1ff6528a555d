"""Issue 16: the 16-client burst in one process, its arms alternated round by round on the same warm server, so the
host's speed drift (sessions 30, 46: ~1.4-2x within minutes) falls on every arm alike. Arms: ``chunk`` (units of one
prompt chunk), ``pieces4`` / ``pieces6`` (a pass whose prompt rows fit as one unit, its MLP in 4 / 6 pieces,
engine/mlp_chunks.py; needs LAYERSTREAM_STACK_PIECES=1, the runner's one-unit rows), or ``env:NAME=VALUE[+...]``
(variables read at each call, e.g. ``env:LAYERSTREAM_VARLEN_PREFILL=0``) and ``runner:ATTR=INT[+...]`` (the
runner's attributes, e.g. ``runner:fill_stacks=0``), each set for its own round only. ``graphs``: units of one chunk
through the prompt graphs (engine/prompt_graphs.py; run with LAYERSTREAM_PROMPT_GRAPHS=1: the warm-up captures them,
and every other arm runs its units eagerly); these arms run with ``LAYERSTREAM_HEAD_AHEAD=0``. ``ahead``: units of one
chunk with the streamed lm_head's last chunks copied ahead into lent buffers (engine/head_ahead.py, the default since
session 49; not beside prompt graphs);
``dense``: each layer's packed weights widened once for a pass's units (engine/dense_layer.py,
``LAYERSTREAM_DENSE_LAYER=1``); ``both``: the two.
Each arm's greedy tokens and first-token logits are compared with ``chunk``'s at the end.

    LAYERSTREAM_STACK_PIECES=1 python bench/unit_ab.py --model DIR [--rounds 4] [--arms chunk,pieces6] [--out ab.json]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench.burst_probe import _fresh, burst  # noqa: E402
from bench.probe_server import server_parser  # noqa: E402
from engine import LLM, head_ahead  # noqa: E402
from engine.dense_layer import layer_bytes  # noqa: E402
from engine.serving.params import SamplingParams  # noqa: E402
from engine.serving.sequence import Sequence  # noqa: E402
from engine.serving.warmup import warm_up  # noqa: E402
from tools.bench_serve import VOCAB, make_jobs  # noqa: E402

ARMS = {"chunk": (False, None), "graphs": (False, None), "pieces4": (True, "4"), "pieces6": (True, "6")}
ALIASES = {"ahead": "env:LAYERSTREAM_HEAD_AHEAD=1", "dense": "env:LAYERSTREAM_HEAD_AHEAD=0+LAYERSTREAM_DENSE_LAYER=1",
           "both": "env:LAYERSTREAM_HEAD_AHEAD=1+LAYERSTREAM_DENSE_LAYER=1"}


def _set_env(items: list) -> object:
    """Set the (name, value) pairs in the environment; returns what puts the old values back."""
    saved = {k: os.environ.get(k) for k, _ in items}
    os.environ.update(dict(items))
    return lambda: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) for k, v in saved.items()]


def _apply(arm: str, runner, one: int):
    """Set an arm's configuration; returns what undoes it."""
    graphs = runner.engine.model.prompt_graphs
    if graphs is not None:
        graphs.enabled = arm == "graphs"
    kind, _, pairs = ALIASES.get(arm, arm).partition(":")
    if kind not in ("env", "runner"):  # without the lm_head copied ahead (on by default since session 49)
        unit, pieces = ARMS[arm]
        runner.one_unit = one if unit else 0
        if pieces:
            os.environ["LAYERSTREAM_MLP_PIECES"] = pieces
        return _set_env([("LAYERSTREAM_HEAD_AHEAD", "0")])
    items = [p.split("=", 1) for p in pairs.split("+")]
    if kind == "env":
        return _set_env(items)
    saved = {k: getattr(runner, k) for k, _ in items}
    for k, v in items:
        setattr(runner, k, int(v))
    return lambda: [setattr(runner, k, v) for k, v in saved.items()]


def main() -> None:
    p = server_parser(__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--arms", default="chunk,pieces4,pieces6", help="comma-separated (module docstring)")
    p.add_argument("--out")
    a = p.parse_args()
    llm = LLM(a.model, vram_budget=a.vram_budget, max_batch=a.max_batch, max_context=a.max_context)
    runner = llm.scheduler.runner
    one = runner.one_unit
    print(f"one unit: {one} rows", flush=True)
    os.environ["LAYERSTREAM_MLP_PIECES"] = "4"
    print(warm_up(llm.scheduler).summary(), flush=True)
    graphs = runner.engine.model.prompt_graphs
    print(f"prompt graphs: {len(graphs.graphs)} at buckets {graphs.buckets}" if graphs else "prompt graphs: none",
          flush=True)
    try:
        _room_report(runner)
    except Exception as e:  # noqa: BLE001 - a diagnostic line; the A/B goes on without it
        print(f"room: not reported ({type(e).__name__}: {e})", flush=True)
    jobs = [job for client in make_jobs(16, 1, (128, 2048), (2, 2), VOCAB, 2) for job in client]
    out, n = [], 0
    for r in range(a.rounds + 1):  # round 0: every arm once, untimed (their first shapes)
        for arm in a.arms.split(","):
            undo = _apply(arm, runner, one)
            torch.cuda.reset_peak_memory_stats()
            try:
                passes = burst(llm, _fresh(llm, jobs, n))
            finally:
                undo()
            n += 1
            peak = torch.cuda.max_memory_allocated() >> 20
            line = " ".join(f"{x['ms']:6.1f} ms ({x['tokens']} tokens)" for x in passes)
            if graphs is not None:
                line += f" replays {graphs.replays}"
            line += f" lent {runner.engine.weights.stream.lent.copies}"  # lm_head chunks copied ahead so far
            line += f" widened {runner.engine.ops.dense_widened}"  # weights widened once for a layer's units
            print(f"round {r} {arm:8s} {line} peak {peak} MiB", flush=True)
            if r:
                out.append({"round": r, "arm": arm, "passes": passes, "peak_mib": peak})
    others = [arm for arm in a.arms.split(",") if arm != "chunk"] if "chunk" in a.arms.split(",") else []
    if others:  # the same prompts through each arm
        out.append(_compare(llm, runner, one, _fresh(llm, jobs, 10_000), others))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


def _room_report(runner) -> None:
    """What a burst pass may spare for the lm_head copied ahead and a layer widened once (engine/head_ahead.py)."""
    eng, plan = runner.engine, runner.engine.plan
    rows = 6647
    host = eng.model.host_states and rows * 2 * eng.cfg.hidden_size * eng.dtype.itemsize > plan.prefill_state_bytes
    print(f"room: states {plan.prefill_state_place} {plan.prefill_state_bytes >> 20} MiB (host states for {rows} rows: "
          f"{host}), workspace {plan.workspace_bytes >> 20} MiB, cap {plan.allocator_bytes >> 20} MiB, allocated "
          f"{torch.cuda.memory_allocated() >> 20} MiB, reserved {torch.cuda.memory_reserved() >> 20} MiB; room for "
          f"{rows} rows {head_ahead.room(eng.model, rows, host, False) >> 20} MiB, a layer widened "
          f"{layer_bytes(eng.cfg, eng.dtype.itemsize) >> 20} MiB; a free KV row "
          f"{2 * eng.cache.k[:, 0].numel() * eng.cache.k.element_size() >> 20} MiB", flush=True)


def _compare(llm: LLM, runner, one: int, prompts: list[list[int]], others: list[str]) -> dict:
    """Each arm's greedy tokens and first-token logits against ``chunk``'s, printed; the record."""
    got, first = {}, {}
    for arm in ["chunk"] + others:
        undo = _apply(arm, runner, one)
        try:
            got[arm], first[arm] = _outputs(llm, prompts)
        finally:
            undo()
    rec = {"sequences": len(prompts), "outputs": got}
    for arm in others:
        same = sum(x == y for x, y in zip(got["chunk"], got[arm]))
        diff = (first[arm] - first["chunk"]).abs()
        print(f"tokens: {same}/{len(prompts)} sequences' 8 greedy tokens equal in {arm} and chunk; first-token "
              f"logits: max |diff| {diff.max():.4f}, mean {diff.mean():.5f} (their spread: std "
              f"{first['chunk'].std():.3f})", flush=True)
        rec[arm] = {"tokens_equal": same, "logits_max_diff": float(diff.max()), "logits_mean_diff": float(diff.mean())}
    return rec


def _outputs(llm: LLM, prompts: list[list[int]], n: int = 8) -> tuple[list[list[int]], torch.Tensor]:
    """Every prompt added at once, run to its end: each one's ``n`` greedy tokens, and the fp32 logits its first
    token was drawn from ([prompts, V], on the host)."""
    sched, params = llm.scheduler, SamplingParams(max_tokens=n, temperature=0.0)
    seqs = [Sequence(p, params, llm.tokenizer) for p in prompts]
    runner, rows = sched.runner, {}
    real = runner.sample

    def sample(logits, ready):  # the rows of the sequences whose first token this pass draws
        for s in ready:
            if not s.output_ids and s.seq_id not in rows:
                rows[s.seq_id] = logits[s.slot].float().cpu()
        return real(logits, ready)
    runner.sample = sample
    try:
        for s in seqs:
            sched.add(s)
        while sched.has_work():
            sched.step()
    finally:
        del runner.sample
    return [list(s.output_ids) for s in seqs], torch.stack([rows[s.seq_id] for s in seqs])


if __name__ == "__main__":
    main()
