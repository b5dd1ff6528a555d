"""Without --prefill-chunk, a budget too small for the default 2048-token chunk gets a smaller chunk (a plan
note) instead of an error; a chunk the user gave is kept, and then the budget is refused. CPU, tiny-qwen2."""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import ModelConfig
from engine.footprint import min_budget
from engine.run import main

BASE = ["--prompt", "hi there", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32", "--json"]


def _run(capsys, argv: list[str]) -> tuple[int, dict | None, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, json.loads(out) if rc == 0 else None, err


@pytest.mark.parametrize("chunk", [512, 128])
def test_an_unset_prefill_chunk_shrinks_to_fit(capsys, tiny_qwen2_dir, chunk):
    cfg = ModelConfig.from_file(tiny_qwen2_dir / "config.json")
    low = {c: min_budget(cfg, torch.float32, max_context=4096, prefill_chunk=c) for c in (2048, 1024, 512, 256, 128)}
    assert low[2048] > low[1024] > low[512] > low[256] > low[128]
    model = ["--model", str(tiny_qwen2_dir)]
    rc, ref, err = _run(capsys, [*model, *BASE])
    assert rc == 0, err
    # fits a `chunk`-token chunk, not one twice as long, with the prompt states in VRAM
    budget = ["--vram-budget", f"{low[chunk]}B", "--prefill-states", "vram"]
    rc, obj, err = _run(capsys, [*model, *BASE, *budget])
    assert rc == 0, err
    plan = obj["plan"]
    assert plan["prefill_chunk"] == chunk and plan["total_bytes"] <= plan["budget_bytes"]
    assert any(f"prefill chunk {chunk} tokens, not 2048" in n for n in plan["notes"])
    assert obj["token_ids"] == ref["token_ids"]
    rc, _, err = _run(capsys, [*model, *BASE, *budget, "--prefill-chunk", "2048"])
    assert rc == 2 and "below the minimum" in err and err.count("\n") == 1
    # auto: the states go to host memory only where that buys a larger chunk (memory.prefill_states)
    rc, auto, err = _run(capsys, [*model, *BASE, "--vram-budget", f"{low[chunk]}B"])
    assert rc == 0, err
    plan = auto["plan"]
    assert plan["prefill_chunk"] >= chunk and auto["token_ids"] == ref["token_ids"]
    assert (plan["prefill_state_place"] == "host") == (plan["prefill_chunk"] > chunk)
