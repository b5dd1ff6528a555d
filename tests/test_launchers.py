"""Launchers built ahead (kernels/launchers.py) and by compile ahead's pool (kernels/ahead.py), with a stand-in
for Triton's driver (no GPU): each warm-up's compiled kernel gets its launcher built in a pool thread, once;
a kernel that has one, or a warm-up that returned no kernel, gets none; a failed build is reported, not raised."""

from __future__ import annotations

import threading

import pytest
import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from kernels.ahead import compile_only
from kernels.launchers import prebuild_launcher


def _body(x_ptr, n, BLOCK):  # never compiled here: only its JITFunction wrapper is used
    pass


class FakeKernel:
    def __init__(self, name: str, run=None) -> None:
        self.src, self.metadata, self._run = f"src of {name}", f"metadata of {name}", run


class FakeDriver:
    def __init__(self, fail: bool = False) -> None:
        self.built: list[tuple[str, str, int]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def launcher_cls(self, src, metadata):
        if self.fail:
            raise RuntimeError("gcc: command not found")
        with self.lock:
            self.built.append((src, metadata, threading.get_ident()))


@pytest.fixture
def fake_driver(monkeypatch):
    """Triton's active driver replaced by a FakeDriver for the test."""
    monkeypatch.setattr(driver, "_active", FakeDriver())
    return driver._active


def test_a_compiled_kernel_gets_its_launcher(fake_driver):
    assert prebuild_launcher(FakeKernel("a")) is True
    assert fake_driver.built == [("src of a", "metadata of a", threading.get_ident())]
    assert prebuild_launcher(FakeKernel("b", run=object())) is False  # launched before: it has one
    assert prebuild_launcher(None) is False and prebuild_launcher("kernel") is False
    assert len(fake_driver.built) == 1


def test_compile_ahead_builds_each_launcher_in_its_pool(fake_driver, monkeypatch):
    made = []

    def warm(fn, *args, grid, warmup, **kwargs):
        made.append(FakeKernel(f"BLOCK={kwargs['BLOCK']}"))
        return made[-1]
    monkeypatch.setattr(JITFunction, "run", warm)
    kernel, buf = JITFunction(_body), torch.zeros(64)
    with compile_only(workers=2, how="threads") as stats:
        for block in (16, 32, 16, 64):  # three specialisations
            kernel[(1,)](buf, 64, BLOCK=block)
    assert (stats.compiles, stats.launchers, stats.failures) == (3, 3, [])
    assert sorted(src for src, _, _ in fake_driver.built) == ["src of BLOCK=16", "src of BLOCK=32", "src of BLOCK=64"]
    assert threading.get_ident() not in {tid for _, _, tid in fake_driver.built}  # built in the pool


def test_a_failed_build_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(driver, "_active", FakeDriver(fail=True))
    monkeypatch.setattr(JITFunction, "run", lambda fn, *a, grid, warmup, **k: FakeKernel("x"))
    with compile_only(workers=1, how="threads") as stats:
        JITFunction(_body)[(1,)](torch.zeros(4), 4, BLOCK=16)
    assert stats.launchers == 0 and len(stats.failures) == 1 and "gcc" in stats.failures[0]
