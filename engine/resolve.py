"""Resolve the ``--model`` flag to a local Hugging Face model directory.

Accepted specs, tried in order:

* a directory path (absolute, relative or ``~``-prefixed) holding ``config.json``, or a hub cache
  repo folder (``.../hub/models--Org--Name``), resolved to its snapshot;
* a ``.gguf`` file, a directory holding one (and no ``config.json``), or the first part of a
  split GGUF set;
* a Hugging Face repo id ``ORG/NAME`` looked up in the local hub cache;
* a short, case-insensitive alias (see ``engine.synth.presets.ALIASES``) resolved as a
  repo id, falling back to the base (non-Instruct) repo when needed.

Nothing is ever downloaded and no remote code is executed.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path

from engine.gguf.paths import is_gguf_path
from engine.synth.presets import ALIASES

logger = logging.getLogger(__name__)

__all__ = ["ModelNotFoundError", "default_model_dir", "hf_hub_cache_dir", "resolve_model"]

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9_][\w.-]*/[\w.-]+$")
_LAYOUT_HINT = ("a Hugging Face model directory needs config.json + *.safetensors (+ tokenizer.json); "
                "or pass a .gguf file")


class ModelNotFoundError(FileNotFoundError):
    """Raised when a ``--model`` spec cannot be resolved to a local directory."""


def default_model_dir() -> Path:
    """Return the cache directory for the embedded default (synthetic) model."""
    if root := os.environ.get("LAYERSTREAM_CACHE"):
        base = Path(root).expanduser()
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        base = Path(xdg).expanduser() / "layerstream"
    else:
        base = Path.home() / ".cache" / "layerstream"
    return base / "default-model"


def hf_hub_cache_dir() -> Path:
    """Return the Hugging Face hub cache directory, honouring the usual env vars."""
    if hub := os.environ.get("HF_HUB_CACHE"):
        return Path(hub).expanduser()
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _aliases() -> dict[str, str]:
    """Alias table with lower-cased keys."""
    return {k.lower(): v for k, v in ALIASES.items()}


def _is_path_like(spec: str) -> bool:
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    return any(s in spec for s in seps) or spec.startswith((".", "~"))


def _check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        if path.is_file() and (path.parent / "config.json").is_file():  # a file of a model directory
            raise FileNotFoundError(f"--model {path}: a file of a model directory; pass the directory: "
                                    f"--model {path.parent}")
        raise FileNotFoundError(f"--model {path}: not a directory; {_LAYOUT_HINT}")
    if not (path / "config.json").is_file():
        if (path / "snapshots").is_dir():  # a hub cache repo folder, models--Org--Name
            snapshot = _snapshot_of(path)
            if snapshot is None:
                raise FileNotFoundError(f"--model {path}: a Hugging Face cache folder whose snapshots/ hold no "
                                        "config.json (an interrupted download?); download it again with "
                                        f"hf download {_repo_of(path)}")
            logger.info("--model %s is a hub cache folder: using its snapshot %s", path, snapshot)
            return snapshot.resolve()
        raise FileNotFoundError(f"--model {path}: no config.json in this directory; {_LAYOUT_HINT}")
    return path.resolve()


def _repo_of(repo_dir: Path) -> str:
    """``models--Org--Name`` -> ``Org/Name``."""
    return repo_dir.name.removeprefix("models--").replace("--", "/", 1)


def _find_snapshot(cache: Path, repo_id: str) -> tuple[Path | None, Path]:
    """Look ``repo_id`` up in ``cache``; return (snapshot or None, repo dir searched)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    return _snapshot_of(repo_dir), repo_dir


def _snapshot_of(repo_dir: Path) -> Path | None:
    """The snapshot of a hub cache repo folder (``models--Org--Name``): refs/main's, else the newest usable."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        candidate = snapshots / revision
        if revision and (candidate / "config.json").is_file():
            logger.debug("%s: using refs/main revision %s", repo_dir.name, revision)
            return candidate
        logger.debug("%s: refs/main -> %r has no usable snapshot", repo_dir.name, revision)
    if not snapshots.is_dir():
        return None
    usable = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
    if not usable:
        return None
    newest = max(usable, key=lambda d: d.stat().st_mtime)
    logger.debug("%s: using newest snapshot %s", repo_dir.name, newest.name)
    return newest


def _base_repo(repo_id: str) -> str | None:
    """``Org/Model-Instruct`` -> ``Org/Model``; None if there is no Instruct suffix."""
    base = re.sub(r"-instruct$", "", repo_id, flags=re.IGNORECASE)
    return base if base != repo_id else None


def _not_found(asked: str, repo_ids: list[str], searched: list[Path], alias: str | None) -> ModelNotFoundError:
    aliases = _aliases()
    if alias is None:
        alias = next((a for a, r in aliases.items() if r.lower() in {x.lower() for x in repo_ids}), None)
    lines = [f"Model {asked!r} not found locally (nothing is ever downloaded).", "Searched:"]
    lines += [f"  - {p}" for p in searched]
    lines.append("To get a real model, download it into the Hugging Face cache:")
    lines += [f"  hf download {r}   (older huggingface_hub: huggingface-cli download {r})" for r in repo_ids[:1]]
    lines.append("Or, for benchmarking, synthesize a random-weight model and point --model at it:")
    lines.append(f"  python -m tools.synth --preset {alias or '<alias>'} --out DIR   then   --model DIR")
    if alias is None:
        lines.append(f"  (known aliases: {', '.join(sorted(aliases))})")
    return ModelNotFoundError("\n".join(lines))


def _resolve_repo(asked: str, repo_ids: list[str], alias: str | None, extra: list[Path]) -> Path:
    cache = hf_hub_cache_dir()
    searched = list(extra)
    for repo_id in repo_ids:
        snapshot, repo_dir = _find_snapshot(cache, repo_id)
        if snapshot is not None:
            logger.info("--model %s -> %s", asked, snapshot)
            return snapshot.resolve()
        searched.append(repo_dir / "snapshots")
    raise _not_found(asked, repo_ids, searched, alias)


def resolve_model(spec: str) -> Path:
    """Resolve a ``--model`` spec (directory, ``ORG/NAME`` or alias) to a model directory.

    Raises:
        FileNotFoundError: a given path is missing or lacks ``config.json``.
        ModelNotFoundError: a repo id / alias is not in the local HF cache, or the
            alias is unknown; the message says where we looked and how to get it.
    """
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("--model is empty; give a directory, ORG/NAME or an alias")
    path = Path(spec).expanduser()
    path_like = _is_path_like(spec) or spec.lower().endswith(".gguf")
    if path.exists() and (path_like or (path / "config.json").is_file()):
        if is_gguf_path(path):
            return path.resolve()
        return _check_model_dir(path)
    if _REPO_ID_RE.match(spec):
        return _resolve_repo(spec, [spec], None, [path.absolute()])
    if path_like:
        raise FileNotFoundError(f"--model {spec}: path does not exist ({path.absolute()})")
    aliases = _aliases()
    alias = spec.lower()
    if alias not in aliases:
        close = difflib.get_close_matches(alias, list(aliases), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(
            f"Unknown model {spec!r}: not a directory, not ORG/NAME, and not a known alias.{hint}\n"
            f"Known aliases: {', '.join(sorted(aliases))}"
        )
    repo_ids = [aliases[alias]]
    if base := _base_repo(repo_ids[0]):
        repo_ids.append(base)
    return _resolve_repo(spec, repo_ids, alias, [])
