"""``layerstream serve --step-log FILE``: one JSON line per engine step (one pass over the layers), for
reading a load test afterwards: when each pass ran, how long it took, how many sequences it carried,
how many tokens it fed (prompt slices and decode rows together), the engine thread's CPU time in it
(``cpu_s``: far below its ``step_s``, the thread was blocked, e.g. on the GIL; near it says little, since
CUDA's default synchronisation spins and a wait for the device counts as CPU time), how many
sequences still waited and how many Triton kernel specialisations it had to build (``compiles``:
compiled, or loaded from Triton's disk cache; a warmed-up server's passes should build none), and which
(``built``: Triton's description of each, with its constexprs and argument specialisations, where there
were any); ``mono_s``, its end on ``time.monotonic()``, matches a load test's request times
(tools/ttft_breakdown.py); on a GPU, ``peak_mib`` is the most memory the caching allocator had allocated during
the step (how close the pass came to the budget's allocator cap) and ``reserved_mib`` what it held at its end;
``dev_allocs`` / ``alloc_retries`` / ``alloc_syncs`` / ``host_allocs`` / ``host_alloc_us``, where they grew in the
step, torch's allocator counters (:class:`AllocCounts`: device allocations, retries after freeing the cache,
device-wide synchronisations, new pinned host blocks and their time); ``graph_replays``, how many of its prompt
units' layers ran as captured graphs (engine/prompt_graphs.py);
``lent``, how many lm_head chunks it copied ahead into lent buffers (engine/head_ahead.py), and ``widened``, how
many packed weights it widened once for a layer's units (engine/dense_layer.py), where it did;
``arrived_s``, where the step admitted sequences, the first and last of their arrivals (``time.monotonic()``, once
tokenized), and ``received_s``, when the first and last of their requests reached the server's app (uvicorn had
read their headers): a request's time from its send to the pass that ran it split into the connection and HTTP
parsing, the app's checks and tokenization, and the wait."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from engine.serving.scheduler import StepStats
from kernels.ahead import hook_knobs


class StepLog:
    """Appends a line per step to ``path`` (opened now: a bad path fails before the model loads)."""

    def __init__(self, path: str | Path) -> None:
        try:  # line-buffered: a killed server keeps the lines of its steps
            self._file = open(path, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--step-log {path}: cannot open it for writing ({e.strerror}); give a writable path") \
                from None
        self._t0 = time.monotonic()
        self.compiles = 0
        self.built: list[str] = []
        self._replays = 0  # StepStats.graph_replays at the last line
        self._lent = self._widened = 0  # StepStats.lent_copies and .dense_widened at the last line
        self._counts = AllocCounts()
        self._runtime = hook_knobs()
        self._previous = None
        if self._runtime is not None:  # chained: a hook installed before keeps working
            self._previous = self._runtime.jit_cache_hook
            self._runtime.jit_cache_hook = self._count

    def _count(self, *args, **kwargs):
        """Triton's ``jit_cache_hook``: called once for each specialisation a launch has to build; a
        truthy return would skip the build, so it returns what the hook before it returns."""
        self.compiles += 1
        self.built.append(_described(kwargs))
        return self._previous(*args, **kwargs) if self._previous is not None else False

    def __call__(self, st: StepStats) -> None:
        end = time.monotonic() - self._t0
        line = {"step": st.steps, "start_s": round(end - st.last_step_s, 6),
                "mono_s": round(self._t0 + end, 6),  # time.monotonic() at its end
                "step_s": round(st.last_step_s, 6), "cpu_s": round(st.last_cpu_s, 6), "batch": st.last_batch,
                "tokens": st.last_tokens, "waiting": st.last_waiting, "generated_total": st.generated_tokens,
                "compiles": self.compiles, "graph_replays": st.graph_replays - self._replays}
        self._replays = st.graph_replays
        if st.lent_copies > self._lent:
            line["lent"] = st.lent_copies - self._lent
        if st.dense_widened > self._widened:
            line["widened"] = st.dense_widened - self._widened
        self._lent, self._widened = st.lent_copies, st.dense_widened
        if st.last_arrivals is not None:
            line["arrived_s"] = [round(t, 6) for t in st.last_arrivals]
            line["received_s"] = [round(t, 6) for t in st.last_received]
        if self.built:
            line["built"] = self.built
        line.update(_memory())
        line.update(self._counts.step())
        self._file.write(json.dumps(line) + "\n")
        self.compiles, self.built = 0, []

    def close(self) -> None:
        if self._runtime is not None and self._runtime.jit_cache_hook == self._count:
            self._runtime.jit_cache_hook = self._previous
        self._file.close()


def _described(hook_kwargs: dict) -> str:
    """One build as the hook saw it: Triton's repr (kernel, launch options; Triton 3.6 leaves its argument list
    empty), then the constexprs and the specialised argument attributes (e.g. divisible by 16), which tell two
    builds of one kernel apart."""
    text = str(hook_kwargs.get("repr", "?"))
    compile_ = hook_kwargs.get("compile") or {}
    for name in ("constants", "configs"):
        if compile_.get(name):
            text += f" {name}={compile_[name]}"
    return text[:4000]


# torch's allocator counters a step line carries (as their growth in the step, where it grew), by their path in
# torch's nested statistics: the caching allocator's calls to cudaMalloc (or mappings of expandable segments), its
# retries after freeing its cache and its device-wide synchronisations; the pinned host allocator's new blocks and
# the time it took for them (us)
_DEVICE_COUNTS = {"dev_allocs": ("num_device_alloc",), "alloc_retries": ("num_alloc_retries",),
                  "alloc_syncs": ("num_sync_all_streams",)}
_HOST_COUNTS = {"host_allocs": ("num_host_alloc",), "host_alloc_us": ("host_alloc_time", "total")}


class AllocCounts:
    """The growth of torch's allocator counters since the last :meth:`step` (what a pass paid its allocators for:
    session 55's first 16-request burst page-locked 48 new pinned blocks in one pass, 41 ms under cProfile). Made
    before CUDA is in use, its first step counts from zero: a server's first line holds its load and warm-up too.
    ``device_stats`` / ``host_stats``: the nested statistics' readers (tests pass stand-ins)."""

    def __init__(self, device_stats=None, host_stats=None) -> None:
        self._device = device_stats or _device_stats
        self._host = host_stats or _host_stats
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        out = {}
        for stats, counts in ((self._device(), _DEVICE_COUNTS), (self._host(), _HOST_COUNTS)):
            for name, path in counts.items():
                value = stats
                for key in path:
                    value = value.get(key) if isinstance(value, dict) else None
                if isinstance(value, (int, float)):
                    out[name] = value
        return out

    def step(self) -> dict[str, int]:
        """The counters that grew since the last call, by how much."""
        now = self._read()
        grown = {k: int(v - self._last.get(k, 0)) for k, v in now.items() if v > self._last.get(k, 0)}
        self._last = now
        return grown


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _device_stats() -> dict:
    """The caching allocator's statistics, nested (no flattening: a step line reads three of them)."""
    return torch.cuda.memory_stats_as_nested_dict() if _cuda_in_use() else {}


def _host_stats() -> dict:
    """The pinned host allocator's statistics, nested; {} on a torch without them."""
    get = getattr(torch.cuda, "host_memory_stats_as_nested_dict", None)
    if get is None or not _cuda_in_use():
        return {}
    try:
        return get()
    except RuntimeError:  # a build without the pinned allocator's statistics
        return {}


def _memory() -> dict[str, int]:
    """The step's peak allocated and the end's reserved device memory (MiB) once CUDA is in use; the peak is
    reset for the next step (nothing else in a server reads it)."""
    if not _cuda_in_use():
        return {}
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return {"peak_mib": peak >> 20, "reserved_mib": torch.cuda.memory_reserved() >> 20}
