"""Tuning picks shipped with the package, so a first run on a GPU we measured is not a tuning session.

``kernels/tuned/<gpu>.json`` holds the entries (kernel -> key -> pick) of a tuning-cache file
(``kernels/tuning_cache.py``) made on that GPU, merged by :func:`export`. They are keyed like the
cache but not by software version or kernel source: a shipped pick is only a starting point, and
``tuning_cache.choose`` accepts it only when it is still one of the kernel's current candidates
(otherwise the shape is timed as before). The user's own cache always wins over a shipped pick.
``LAYERSTREAM_SHIPPED_TUNING=0`` ignores the shipped picks: every shape is timed on this machine and the
cache keeps the picks, which :func:`export` can then ship (after a change of the candidates).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULTS_DIR = Path(__file__).resolve().parent / "tuned"


def defaults_path(gpu: str, directory: Path | None = None) -> Path:
    """The shipped file of GPU ``gpu`` (its sanitised name) in ``directory`` (default: DEFAULTS_DIR)."""
    return (directory or DEFAULTS_DIR) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', gpu).strip('_.') or 'gpu'}.json"


@functools.cache
def _entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the shipped kernel tuning file %s (%s)", path, e)
        return {}
    entries = raw.get("entries") if isinstance(raw, dict) else None
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _ignored() -> bool:
    return os.environ.get("LAYERSTREAM_SHIPPED_TUNING", "1") == "0"


def lookup(gpu: str, kernel: str, key: str, directory: Path | None = None) -> Any | None:
    """The shipped pick for ``kernel``'s ``key`` (a cache key string) on ``gpu``, or None (also when
    ``LAYERSTREAM_SHIPPED_TUNING=0``)."""
    return None if _ignored() else _entries(defaults_path(gpu, directory)).get(kernel, {}).get(key)


def has_defaults(gpu: str, directory: Path | None = None) -> bool:
    """Whether picks are shipped for ``gpu`` (and not ignored)."""
    return not _ignored() and bool(_entries(defaults_path(gpu, directory)))


def export(cache_files: list[Path], directory: Path | None = None) -> list[Path]:
    """Merge tuning-cache files into the shipped file of each one's GPU (written atomically; picks
    already shipped for a key are replaced by the newer file's). Returns the files written."""
    written = []
    for cache_file in cache_files:
        raw = json.loads(Path(cache_file).read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict) or not raw.get("gpu"):
            raise ValueError(f"{cache_file} is not a kernel tuning-cache file (no gpu / entries): pass a file "
                             "from ~/.cache/layerstream/tuning")
        out = defaults_path(raw["gpu"], directory)
        merged = dict(_entries(out)) if out.is_file() else {}
        for kernel, section in raw["entries"].items():
            merged[kernel] = {**merged.get(kernel, {}), **section}
        content = {"gpu": raw["gpu"], "capability": raw.get("capability"), "from": {
            k: raw.get(k) for k in ("torch", "triton")}, "entries": merged}
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, out)
        _entries.cache_clear()
        written.append(out)
    return written
