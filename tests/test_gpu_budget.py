"""--vram-budget is the process's GPU memory as the driver counts it (GPU only).

Each case runs ``engine.run`` in a child process while a sampler thread here reads the child's GPU
memory from NVML every 20 ms (what nvidia-smi shows: CUDA context, kernels and torch's allocator
together); the peak must stay within the budget. Needs ``LAYERSTREAM_BIG_MODEL`` (a synthetic
Qwen2.5-7B from ``python -m tools.synth --preset qwen2.5-7b``); ``LAYERSTREAM_BUDGET_LOG`` names a
JSON-lines file to append each case's figures to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

MODEL = os.environ.get("LAYERSTREAM_BIG_MODEL")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or not MODEL,
                                 reason="needs a CUDA GPU and LAYERSTREAM_BIG_MODEL (a synthetic 7B)")]

LONG = " ".join(["hello"] * 8000)  # ~16k tokens of the synthetic tokenizer (word and space)
CASES = {"short": ["--prompt", "Hello", "--max-new-tokens", "16"],
         "16k": ["--no-chat", "--prompt", LONG, "--max-new-tokens", "4", "--max-context", "20000"],
         "batch8": [*(["--prompt", "Hello"] * 8), "--batch", "8", "--max-new-tokens", "16", "--max-context", "2048"]}


def _sample(pid: int, stop: threading.Event, peak: list[int]) -> None:
    import pynvml
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        while not stop.wait(0.02):
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == pid and p.usedGpuMemory:
                    peak[0] = max(peak[0], int(p.usedGpuMemory))
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("budget_gb", [4, 6, 12])
def test_process_peak_within_budget(budget_gb, case, tmp_path):
    args = [sys.executable, "-m", "engine.run", "--model", MODEL, "--vram-budget", f"{budget_gb}GB", "--json",
            *CASES[case]]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample, args=(child.pid, stop, peak), daemon=True)
    sampler.start()
    out, err = child.communicate(timeout=300)
    stop.set()
    sampler.join()
    assert child.returncode == 0, err[-2000:]
    rep = json.loads(out)
    plan, budget = rep["plan"], budget_gb * 10**9
    row = {"budget": budget, "case": case, "nvml_peak": peak[0], "outside_planned": plan["outside_bytes"],
           "planned_total": plan["total_bytes"], "resident_layers": len(plan["resident_layers"]),
           "prompt_tokens": rep["stats"]["prompt_tokens"]}
    if log := os.environ.get("LAYERSTREAM_BUDGET_LOG"):
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert peak[0] > 0, "NVML never saw the child process"
    assert peak[0] <= budget, f"process peak {peak[0] / 1e9:.3f} GB > budget {budget_gb} GB: {row}"
