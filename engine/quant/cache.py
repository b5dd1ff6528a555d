"""An opt-in cache of packed quantized layers (``--quant-cache``): repack or round once, read after.

Converting AWQ / GPTQ checkpoints to the canonical layout, and ``--quantize``, cost host time at every
load (a 7B AWQ gate_proj took ~0.7 s on one core), and a layer streamed from disk would be converted
again at every step. With the cache, the first load writes every layer's packed unit bytes, in layer
order, to one file; later runs (and the disk tier) read them as raw byte spans like a full-precision
checkpoint's. The file lives in ``$LAYERSTREAM_CACHE/quant`` (else ``$XDG_CACHE_HOME/layerstream/quant``,
else ``~/.cache/layerstream/quant``), is named by a key over the checkpoint files' names, sizes and
mtimes and the exact layer layout, and is written to a temporary sibling, fsynced and renamed into
place. A stamp beside it (``<file>.stamp``, written the same way after it) records the file's size, mtime and
inode as written: a cache file changed since (edited, truncated and regrown, copied over) or without its stamp
is packed and written again, never read. A cache that cannot be written logs a warning and the layers are
packed on the host as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine.checkpoint import Checkpoint
from engine.quant.layout import QuantLayerLayout

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$LAYERSTREAM_CACHE/quant``, else ``$XDG_CACHE_HOME/layerstream/quant``, else ``~/.cache/...``."""
    if root := os.environ.get("LAYERSTREAM_CACHE"):
        return Path(root).expanduser() / "quant"
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "layerstream" / "quant"
    return Path.home() / ".cache" / "layerstream" / "quant"


def cache_key(ckpt: Checkpoint, layout: QuantLayerLayout) -> str:
    """Hex key over the checkpoint files (names, sizes, mtimes) and the layer layout."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    config = ckpt.model_dir / "config.json"  # a GGUF checkpoint's model_dir is its file: no config.json
    for f in sorted({i.file for i in ckpt.tensors.values()} | ({config} if config.is_file() else set())):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    q = layout.quant
    h.update(repr((q.spec, str(q.scale_dtype), q.act_order, q.forms, str(layout.dtype), layout.nbytes,
                   sorted((n, e.offset, e.shape, str(e.dtype)) for n, e in layout.entries.items()))).encode())
    return h.hexdigest()[:32]


def packed_layers_file(ckpt: Checkpoint, layout: QuantLayerLayout, layers: int,
                       pack: Callable[[int, torch.Tensor], None], threads: int = 4) -> Path | None:
    """The cache file holding ``layers`` packed layers (layer i at byte ``i * layout.nbytes``), written
    first if absent by ``pack(i, buf)`` in ``threads`` threads. None when the checkpoint's own bytes are
    already the packed ones (``QuantLayerLayout.file_spans``) or the file cannot be written."""
    if layout.file_spans("model.layers.0", {n: i.dtype for n, i in ckpt.tensors.items()}):
        return None
    path = cache_root() / f"{ckpt.model_dir.name}-{cache_key(ckpt, layout)}.bin"
    if path.is_file() and _stamp_of(path) == _read_stamp(path) and path.stat().st_size == layers * layout.nbytes:
        return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            _write_layers(f, layout.nbytes, layers, pack, threads)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _atomic_write(_stamp_path(path), json.dumps(_stamp_of(path)).encode())
    except OSError as e:
        log.warning("cannot write the packed-layer cache %s (%s); packing the layers on the host instead", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return None
    log.info("wrote the packed-layer cache %s (%d layers, %d bytes)", path, layers, layers * layout.nbytes)
    return path


def _write_layers(f, nbytes: int, layers: int, pack: Callable[[int, torch.Tensor], None], threads: int) -> None:
    """Pack layers ``threads`` at a time (bounded memory) and append them in order."""
    def one(i: int) -> torch.Tensor:
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        pack(i, buf)
        return buf

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, layers, max(1, threads)):
            for buf in pool.map(one, range(start, min(layers, start + max(1, threads)))):
                f.write(buf.numpy().data)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def _stamp_of(path: Path) -> dict:
    """What identifies the cache file as written: size, mtime and inode."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _read_stamp(path: Path) -> dict | None:
    """The stamp written beside ``path``; None if absent or unreadable (the file is then written again)."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
