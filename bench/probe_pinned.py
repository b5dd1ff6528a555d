"""Probe: the fastest way to get a streamed model's bytes into page-locked host memory.

A warm `engine.run` start at 6 GB on the 7B spent 4.75 s of 13.3 s allocating 9.1 GiB of pinned
buffers (torch.empty(pin_memory=True), one after another) before packing them. This times, on
21 buffers of one Qwen2.5-7B layer each (466 MB):
  A  torch.empty(pin_memory=True), serial, then fill (8 threads)
  B  the same allocations from 8 threads, then fill
  C  pageable torch.empty, fill from 8 threads (first touch there), then cudaHostRegister, serial
  D  as C, registering from 8 threads
and the host-to-device rate out of one buffer of each (registered memory must copy as fast as
pinned). Prints one JSON object.  Usage: python bench/probe_pinned.py [--buffers 21]
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

LAYER = 466_092_032  # bytes of one Qwen2.5-7B decoder layer in bf16


def _fill(bufs: list[torch.Tensor], src: torch.Tensor, threads: int = 8) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: b.copy_(src[: b.numel()]), bufs))
    return time.perf_counter() - t


def _register(bufs: list[torch.Tensor], threads: int) -> float:
    rt = torch.cuda.cudart()
    t = time.perf_counter()

    def one(b: torch.Tensor) -> None:
        err = rt.cudaHostRegister(b.data_ptr(), b.numel(), 0)
        assert int(err) == 0, f"cudaHostRegister failed: {err}"
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, bufs))
    return time.perf_counter() - t


def _h2d_gbps(buf: torch.Tensor) -> float:
    dst = torch.empty(buf.numel(), dtype=torch.uint8, device="cuda")
    dst.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * buf.numel() / (time.perf_counter() - t) / 1e9


def _pinned(n: int, threads: int, src: torch.Tensor) -> dict:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        bufs = list(pool.map(lambda _: torch.empty(LAYER, dtype=torch.uint8, pin_memory=True), range(n)))
    alloc = time.perf_counter() - t
    fill = _fill(bufs, src)
    res = {"alloc_s": alloc, "fill_s": fill, "total_s": alloc + fill, "h2d_GBps": _h2d_gbps(bufs[0]),
           "is_pinned": bufs[0].is_pinned()}
    del bufs
    torch._C._host_emptyCache()
    return res


def _registered(n: int, threads: int, src: torch.Tensor) -> dict:
    t = time.perf_counter()
    bufs = [torch.empty(LAYER, dtype=torch.uint8) for _ in range(n)]
    alloc = time.perf_counter() - t
    fill = _fill(bufs, src)
    reg = _register(bufs, threads)
    res = {"alloc_s": alloc, "fill_s": fill, "register_s": reg, "total_s": alloc + fill + reg,
           "h2d_GBps": _h2d_gbps(bufs[0]), "is_pinned": bufs[0].is_pinned()}
    t = time.perf_counter()
    for b in bufs:
        torch.cuda.cudart().cudaHostUnregister(b.data_ptr())
    res["unregister_s"] = time.perf_counter() - t
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--buffers", type=int, default=21)
    args = p.parse_args(argv)
    torch.cuda.init()
    src = torch.randint(0, 255, (LAYER,), dtype=torch.uint8)  # the mapped checkpoint stands in here
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "buffers": args.buffers,
           "buffer_bytes": LAYER, "pageable_h2d_GBps": _h2d_gbps(src)}
    out["A_pinned_serial"] = _pinned(args.buffers, 1, src)
    out["B_pinned_8_threads"] = _pinned(args.buffers, 8, src)
    out["C_register_serial"] = _registered(args.buffers, 1, src)
    out["D_register_8_threads"] = _registered(args.buffers, 8, src)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
