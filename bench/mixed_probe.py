"""Issue 16's steady load in process: a prompt's pass beside decoding rows against the same prompt alone.

    python bench/mixed_probe.py --model DIR [--decoders 15 --prompt 1050 --rounds 4] [--arms default,...]
        [--trace-arm ARM ... --trace-dir D] [--cprofile] [--out mixed.json]

Session 50's served steady load (16 clients, 3 requests each) had its prompt passes beside 15 decoding rows at a
median of 144-151 ms against 100-104 ms for a prompt alone of as many tokens (`mixed_passes.txt`), a decode step
75.7 ms: the 16-client TTFT target's miss. Here, on one warm scheduler: each round times a pass of one fresh
``--prompt``-token prompt alone (nothing decoding), then ``--decoders`` sequences are started and kept decoding,
and each arm's round times a pure decode step (its CUDA graphs), the same step eagerly (no graphs: what a decode
group costs when it runs beside a prompt), and a mixed pass (a fresh prompt joining the decoding rows, its one
token sampled in that pass, so the batch stays the same). Arms (unit_ab's forms): ``default``, ``env:NAME=VALUE``,
``runner:ATTR=INT``, alternated round by round. ``--trace-arm``: one more mixed pass of that arm traced (CUDA
activity only) into ``--trace-dir``, with bench/pass_gaps.py's gaps by cause; ``--cprofile``: one more (default)
under cProfile.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.burst_probe import cprofiled, traced_steps  # noqa: E402
from bench.probe_server import server_parser, sync  # noqa: E402
from bench.unit_ab import _apply  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.serving.sequence import Sequence  # noqa: E402
from engine.serving.warmup import warm_up  # noqa: E402
from tools.bench_serve import VOCAB  # noqa: E402


class Probe:
    """One warm scheduler and the prompts it is fed (each with a first token of its own: nothing reused)."""

    def __init__(self, llm: LLM, prompt: int) -> None:
        self.llm, self.sched, self.prompt, self.n = llm, llm.scheduler, prompt, 0
        self.vocab = llm.engine.cfg.vocab_size

    def ids(self, n: int) -> list[int]:
        self.n += 1
        return [(VOCAB + 7919 * self.n + j) % self.vocab for j in range(n)]

    def step(self) -> dict:
        """One synchronized scheduler step: its wall ms, batch and tokens."""
        sync()
        t = time.perf_counter()
        self.sched.step()
        sync()
        st = self.sched.stats
        return {"ms": (time.perf_counter() - t) * 1e3, "batch": st.last_batch, "tokens": st.last_tokens}

    def add(self, n: int, max_tokens: int) -> Sequence:
        s = Sequence(self.ids(n), SamplingParams(max_tokens=max_tokens, temperature=0.0), self.llm.tokenizer)
        self.sched.add(s)
        return s

    def fresh_pass(self) -> dict:
        """A fresh prompt's pass (its one token drawn there): alone, or joining the decoding rows."""
        s = self.add(self.prompt, 1)
        out = self.step()
        assert s.output_ids, "the prompt did not finish in one pass"
        return out

    def start_decoders(self, count: int, prompt: int, max_tokens: int) -> list[Sequence]:
        seqs = [self.add(prompt, max_tokens) for _ in range(count)]
        while any(not s.output_ids for s in seqs):
            self.step()
        return seqs

    def eager_decode(self) -> dict:
        """A pure decode step without its CUDA graphs (as the decode group runs beside a prompt)."""
        eng = self.llm.engine
        graph, eng.graph = eng.graph, None
        try:
            return self.step()
        finally:
            eng.graph = graph


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = server_parser(__doc__.split("\n")[0])
    p.add_argument("--decoders", type=int, default=15)
    p.add_argument("--decoder-prompt", type=int, default=128)
    p.add_argument("--prompt", type=int, default=1050)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--arms", default="default")
    p.add_argument("--trace-arm", action="append", default=[])
    p.add_argument("--trace-dir", default=".")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    llm = LLM(a.model, vram_budget=a.vram_budget, max_batch=a.max_batch, max_context=a.max_context)
    print(f"{warm_up(llm.scheduler).summary()}", flush=True)
    runner, pr = llm.scheduler.runner, Probe(llm, a.prompt)
    eng = llm.engine
    print(f"decode graph: {'captured' if eng.graph is not None else 'none'}; prompt states: "
          f"{eng.plan.prefill_state_place} {eng.plan.prefill_state_bytes >> 20} MiB; prefill chunk "
          f"{eng.opts.prefill_chunk}", flush=True)
    arms = a.arms.split(",")
    rec: dict = {"args": vars(a), "lone": [], "rounds": []}
    for r in range(a.rounds + 1):  # round 0 untimed: every path's first shapes
        x = pr.fresh_pass()
        print(f"round {r} lone: {x['ms']:6.1f} ms ({x['tokens']} tokens)", flush=True)
        if r:
            rec["lone"].append(x)
    budget = (a.rounds + 1) * len(arms) * 6 + 8
    decoders = pr.start_decoders(a.decoders, a.decoder_prompt, budget)
    for r in range(a.rounds + 1):
        for arm in arms:
            undo = (lambda: None) if arm == "default" else _apply(arm, runner, runner.one_unit)
            try:
                row = {"round": r, "arm": arm, "graph": [pr.step() for _ in range(2)], "eager": pr.eager_decode()}
                units = runner.graph_unit_passes
                row["mixed"] = pr.fresh_pass()
                row["mixed"]["graph_unit"] = runner.graph_unit_passes - units
            finally:
                undo()
            print(f"round {r} {arm:24s} decode graphs {row['graph'][-1]['ms']:6.1f} eager {row['eager']['ms']:6.1f}"
                  f"  mixed {row['mixed']['ms']:6.1f} ms (batch {row['mixed']['batch']}, "
                  f"{row['mixed']['tokens']} tokens, graph unit {row['mixed']['graph_unit']})", flush=True)
            if r:
                rec["rounds"].append(row)
    print(f"lone median {_med([x['ms'] for x in rec['lone']]):.1f} ms", flush=True)
    for arm in arms:
        rows = [x for x in rec["rounds"] if x["arm"] == arm]
        print(f"{arm}: medians: decode graphs {_med([x['graph'][-1]['ms'] for x in rows]):.1f}, eager "
              f"{_med([x['eager']['ms'] for x in rows]):.1f}, mixed {_med([x['mixed']['ms'] for x in rows]):.1f} ms",
              flush=True)
    for arm in a.trace_arm:
        undo = (lambda: None) if arm == "default" else _apply(arm, runner, runner.one_unit)
        try:
            pr.step()  # a decode step between mixed passes, as in the rounds
            name = "".join(c if c.isalnum() else "_" for c in arm)
            print(f"traced arm {arm}:", flush=True)
            rec.setdefault("gaps", {})[arm] = traced_steps(pr.fresh_pass, str(Path(a.trace_dir) / f"trace_{name}.json.gz"))
        finally:
            undo()
    if a.cprofile:
        rec["cprofile"] = cprofiled(pr.fresh_pass)
        print("\n".join(rec["cprofile"]), flush=True)
    assert all(not s.finished for s in decoders), "a decoder finished early: raise its max_tokens"
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
