"""The RAM this process may use: the machine's (``psutil``), held to the memory limit of the cgroup it runs in.

In a container (Docker, Kubernetes) ``/proc/meminfo`` shows the host's memory, not the container's limit, so a
plan checked against it passed and the kernel then killed the run at the limit, without a line of output (session
41: a run needing ~2.7 GiB in a 1.2 GiB cgroup exited 137 while the preflight saw 23 GB available). The limit is
read from cgroup v2 (``memory.max``, ``memory.current`` less the reclaimable ``inactive_file``) or v1
(``memory.limit_in_bytes``, ``memory.usage_in_bytes``), for the process's own cgroup and those above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")  # tests point it elsewhere
_NO_LIMIT = 1 << 60  # v1 reports "no limit" as a huge number


@dataclass(frozen=True)
class Ram:
    total: int  # bytes this process could ever have
    available: int  # bytes it could take now


def ram() -> Ram:
    """The machine's total and available RAM (MemAvailable), each held to the tightest cgroup limit above us."""
    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    for limit, used in _cgroup_limits():
        total, available = min(total, limit), min(available, max(0, limit - used))
    return Ram(total, available)


def _cgroup_limits() -> list[tuple[int, int]]:
    """(limit, bytes in use) of each cgroup with a memory limit from this process's up to the root."""
    out = []
    for directory in _cgroup_dirs():
        limit = _read_int(directory / "memory.max") or _read_int(directory / "memory.limit_in_bytes")
        if limit is None or limit >= _NO_LIMIT:
            continue
        used = _read_int(directory / "memory.current")
        if used is not None:
            used -= _stat(directory / "memory.stat", "inactive_file")
        else:
            used = (_read_int(directory / "memory.usage_in_bytes") or 0) - _stat(directory / "memory.stat",
                                                                                 "total_inactive_file")
        out.append((limit, max(0, used)))
    return out


def _cgroup_dirs() -> list[Path]:
    """This process's cgroup directories (v2's unified one, v1's memory one) and their parents, nearest first."""
    dirs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        base = CGROUP_ROOT if controllers == "" else CGROUP_ROOT / "memory" if "memory" in controllers.split(",") \
            else None
        if base is None:
            continue
        here = base / path.strip("/")
        while True:
            dirs.append(here)
            if here == base:
                break
            here = here.parent
    return dirs or [CGROUP_ROOT, CGROUP_ROOT / "memory"]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max": no limit


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
