"""Ctrl-C while a command starts (engine.interrupts): held until torch has loaded, then one line. The
signal is delivered from an import hook, so the tests do not depend on timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from engine.run import main as run_main


class _InterruptOnImport:
    """A meta path finder that delivers SIGINT to this process when ``name`` is imported: a Ctrl-C that
    lands while torch (which engine.cli_session imports) loads."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name, path, target=None):
        if name == self.name:
            os.kill(os.getpid(), signal.SIGINT)
        return None


@pytest.fixture
def ctrl_c_in_torchs_import(monkeypatch):
    import engine
    import engine.cli_session  # (run alone, nothing has imported it yet)

    monkeypatch.setattr(engine, "cli_session", sys.modules["engine.cli_session"])  # restored after: the import
    monkeypatch.delitem(sys.modules, "engine.cli_session")  # below binds a fresh module to both names
    monkeypatch.setattr(sys, "meta_path", [_InterruptOnImport("engine.cli_session"), *sys.meta_path])


def test_layerstream_stops_with_one_line(capsys, ctrl_c_in_torchs_import):
    """Before: a KeyboardInterrupt traceback from inside torch's import (or, inside numpy's C init, an
    ImportError one)."""
    assert run_main(["--prompt", "hi", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_the_server_stops_before_serving_with_one_line(capsys, ctrl_c_in_torchs_import):
    """Before: a KeyboardInterrupt traceback, and once a server that went on serving."""
    from engine.serve import main

    assert main(["--port", "0"]) == 0
    assert capsys.readouterr().err.strip() == "layerstream: stopped before serving"


# A Ctrl-C that lands in code exec'd from a string (dataclasses build their methods so) and is handled:
# CPython still marks it unhandled, and under ``python -m`` kills the process with SIGINT at exit
_EXEC_CTRL_C = """
import os, signal, sys
signal.signal(signal.SIGINT, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
try:
    exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10**6): pass")
except KeyboardInterrupt:
    pass
if sys.argv[1:] == ["forget"]:
    from engine.interrupts import forget_handled_interrupt
    forget_handled_interrupt()
sys.exit(0)
"""


def _run_module(tmp_path, name: str, source: str, *args: str, extra_path: str = "") -> subprocess.CompletedProcess:
    (tmp_path / f"{name}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), extra_path,
                                                                   os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", name, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_handled_ctrl_c_in_execd_code_exits_with_the_programs_code(tmp_path):
    """The interpreter's behaviour this guards against, then the reset."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert _run_module(tmp_path, "ctrl_c_exec", _EXEC_CTRL_C, extra_path=root).returncode == -signal.SIGINT
    assert _run_module(tmp_path, "ctrl_c_exec", _EXEC_CTRL_C, "forget", extra_path=root).returncode == 0


def test_the_server_module_exits_0_after_a_ctrl_c_inside_execd_code(tmp_path, tiny_qwen2_dir):
    """Before: ``python -m engine.serve`` printed "stopped before serving" and died by SIGINT (exit 130)
    about one time in ten when Ctrl-C came while the server's imports built their dataclasses."""
    hook = textwrap.dedent("""
        import os, signal, sys

        class _Hook:  # uvicorn's import: the signal raised inside exec'd code
            def find_spec(self, name, path, target=None):
                if name == "uvicorn":
                    sys.meta_path.remove(self)
                    exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10**6): pass")
                return None

        sys.meta_path.insert(0, _Hook())
        """)
    (tmp_path / "sitecustomize.py").write_text(hook)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp_path), root))}
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--model", str(tiny_qwen2_dir), "--port", "0"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "layerstream: stopped before serving", r.stderr
    assert r.returncode == 0, r.stderr
