"""Ctrl-C while a command starts (engine.interrupts): held until torch has loaded, then one line. The
signal is delivered from an import hook, so the tests do not depend on timing."""

from __future__ import annotations

import os
import signal
import sys

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
