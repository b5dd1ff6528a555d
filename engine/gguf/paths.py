"""Which paths are GGUF models, and the files of one (a single file or a split set).

Kept free of the ``gguf`` package so that ``--model`` resolution does not import it.
"""

from __future__ import annotations

import re
from pathlib import Path

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def is_gguf_path(path: str | Path) -> bool:
    """True for a ``.gguf`` file, or a directory with a ``.gguf`` file and no ``config.json``."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        return True
    return p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))


def find_parts(path: str | Path) -> list[Path]:
    """The file(s) of the model at ``path``: one GGUF, or every part of a split set given its first part."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.glob("*.gguf") if not (m := SPLIT_RE.match(f.name)) or int(m["no"]) == 1)
        if not files:
            raise FileNotFoundError(f"--model {p}: no .gguf file in this directory")
        if len(files) > 1:
            raise ValueError(f"--model {p}: this directory holds several GGUF models "
                             f"({', '.join(f.name for f in files[:6])}); pass the file itself")
        p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"--model {p}: no such file")
    m = SPLIT_RE.match(p.name)
    if m is None:
        return [p]
    no, count = int(m["no"]), int(m["count"])
    if no != 1:
        raise ValueError(f"--model {p} is part {no} of a split GGUF: pass the first part "
                         f"({m['stem']}-00001-of-{m['count']}.gguf)")
    parts = [p.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [q.name for q in parts if not q.is_file()]
    if missing:
        raise FileNotFoundError(f"split GGUF {p.name}: part(s) {', '.join(missing)} missing from {p.parent}; "
                                "download every part of the set into the same directory")
    return parts
