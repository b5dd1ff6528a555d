"""The import contracts in pyproject.toml hold, and they catch an import that climbs back up.

``lint-imports`` (import-linter) checks tools > engine > (memory | streamer) > kernels. The
second test copies the packages into a scratch directory, re-adds each import the layering
forbids (the ones the refactor removed: streamer and memory reaching into engine, engine
reaching into tools, the planner importing torch) and checks that the contracts then break.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["engine", "kernels", "memory", "streamer", "tools"]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and " 0 broken" in out.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("streamer/stream.py", "from engine.layout import LayerLayout", "Layers"),
    ("streamer/units.py", "import engine.checkpoint", "know nothing of models"),
    ("memory/planner.py", "from engine.config import ModelConfig", "know nothing of models"),
    ("memory/plan.py", "import streamer.units", "Layers"),
    ("engine/resolve.py", "from tools import synth", "Layers"),
    ("kernels/gemv.py", "import memory.units", "Kernels import nothing"),
    ("memory/planner.py", "import torch", "plain numbers"),
])
def test_a_climbing_import_breaks_a_contract(tmp_path, module, line, contract):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    text = target.read_text()
    head = text.index("\nimport ") if "\nimport " in text else text.index("\nfrom ")
    target.write_text(text[:head] + "\n" + line + text[head:])
    out = _lint(tmp_path)
    assert out.returncode != 0, out.stdout
    broken = [ln for ln in out.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(contract in ln for ln in broken), out.stdout
