"""memory.ram: the RAM the planner and the preflight see is held to the process's cgroup memory limit (in a
container /proc/meminfo shows the host's memory: a run checked against it was killed at the limit, silently)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from memory import ram as ram_mod

GiB = 1 << 30


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A 64 GiB machine with 60 GiB available, and cgroup directories under tmp_path (nearest first)."""
    monkeypatch.setattr(ram_mod.psutil, "virtual_memory", lambda: SimpleNamespace(total=64 * GiB, available=60 * GiB))
    dirs = [tmp_path / "pod" / "container", tmp_path / "pod"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(ram_mod, "_cgroup_dirs", lambda: dirs)
    return dirs


def test_no_limit_leaves_the_machines_figures(machine):
    (machine[0] / "memory.max").write_text("max\n")
    assert ram_mod.ram() == ram_mod.Ram(64 * GiB, 60 * GiB)


def test_a_v2_limit_holds_total_and_available(machine):
    (machine[0] / "memory.max").write_text(f"{4 * GiB}\n")
    (machine[0] / "memory.current").write_text(f"{3 * GiB}\n")  # of which 1 GiB reclaimable page cache
    (machine[0] / "memory.stat").write_text(f"anon 1234\ninactive_file {GiB}\n")
    assert ram_mod.ram() == ram_mod.Ram(4 * GiB, 2 * GiB)


def test_the_tightest_of_nested_limits_wins_and_v1_files_count(machine):
    (machine[0] / "memory.limit_in_bytes").write_text(f"{1 << 62}\n")  # v1's "no limit"
    (machine[1] / "memory.limit_in_bytes").write_text(f"{8 * GiB}\n")
    (machine[1] / "memory.usage_in_bytes").write_text(f"{7 * GiB}\n")
    assert ram_mod.ram() == ram_mod.Ram(8 * GiB, GiB)


def test_the_preflight_sees_the_container(machine):
    from engine.preflight import Machine
    (machine[0] / "memory.max").write_text(f"{2 * GiB}\n")
    (machine[0] / "memory.current").write_text("0\n")
    m = Machine.probe("cpu")
    assert (m.ram_total, m.ram_available) == (2 * GiB, 2 * GiB)
