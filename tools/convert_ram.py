"""Measure a loading thread's working set converting layers, beside its estimate (engine.convert_ram).

    python -m tools.convert_ram MODEL [--quantize int4|int8] [--dtype bf16] [--threads 1] [--repeats 4] [--json]

Packs the model's layers as the loader does (``engine.weights.UnitBuilder``): THREADS threads each convert REPEATS
layers in turn, each into a buffer of its own filled beforehand (the buffers are the plan's, not the working set).
The layers' pages of the checkpoint are read first, so the figure is the growth of the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) while they convert: temporaries and what malloc keeps of
them. Run it in a process of its own (a heap that earlier work left holes in hides part of the peak). Linux only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.convert_ram import conversion
from engine.engine import open_model
from engine.options import DTYPES
from engine.footprint import plan_model
from engine.quant.checkpoint import layer_quant
from engine.weights import UnitBuilder, layer_layout

MiB = 1 << 20


def _status(key: str) -> int:
    """A ``kB`` figure of ``/proc/self/status`` in bytes."""
    found = re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())
    if found is None:
        raise ValueError(f"no {key} in /proc/self/status: this tool needs Linux")
    return int(found.group(1)) * 1024


def _touch_layers(ckpt) -> None:
    """Read one byte a page of every layer tensor, so that their file pages are resident before the peak resets."""
    for info in ckpt.tensors.values():
        if info.name.startswith("model.layers."):
            raw = ckpt._map(info.file)
            int(np.frombuffer(raw, np.uint8, count=info.nbytes, offset=info.offset)[::4096].sum())


def measure(model: str, quantize: str | None = None, dtype: torch.dtype = torch.bfloat16, threads: int = 1,
            repeats: int = 4) -> dict:
    """The peak RSS growth per thread while ``threads`` threads convert ``repeats`` layers each, and the estimate."""
    files = open_model(model)
    cfg, ckpt = files.cfg, files.ckpt
    quant = layer_quant(ckpt, cfg, files.quant, quantize, 128)
    plan = plan_model(cfg, {n: i.nbytes for n, i in ckpt.tensors.items()}, dtype, quant, max_context=128,
                      prefill_chunk=64)  # every layer resident: no lm_head chunks
    estimate, what = conversion(plan, ckpt, cfg, dtype, quant)
    build = UnitBuilder(ckpt, cfg, layer_layout(cfg, dtype, quant))
    units = [build.layer(i, "pinned") for i in range(cfg.num_hidden_layers)]
    out = {"model": str(model), "quantize": quantize, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
           "repeats": repeats, "what": what, "estimate": estimate, "measured": 0}
    if units[0].pack is None:
        return out  # file bytes as they are: nothing converts
    bufs = [torch.zeros(max(u.nbytes for u in units), dtype=torch.uint8) for _ in range(threads)]
    _touch_layers(ckpt)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")

    def work(j: int) -> None:
        for r in range(repeats):
            units[(j + r) % len(units)].pack(bufs[j])
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    out["measured"] = max(0, _status("VmHWM") - base) // threads
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--quantize", choices=("int4", "int8"))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = measure(a.model, a.quantize, DTYPES[a.dtype], a.threads, a.repeats)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['what'] or 'no conversion'}: measured {r['measured'] / MiB:.1f} MiB a thread, "
              f"estimated {r['estimate'] / MiB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
