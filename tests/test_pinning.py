"""Host buffers of streamed layers: packed in parallel, page-locked in place (streamer.pinning)."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from streamer.host import DiskReader, pack_all
from streamer.pinning import PinnedSet

cuda = pytest.mark.cuda  # skipped without CUDA by tests/conftest.py


def _packers(sizes: dict[int, int]):
    return {u: (lambda buf, u=u: buf.fill_(u + 1)) for u in sizes}


def test_pack_all_fills_every_unit_and_reports_progress():
    sizes = {0: 10, 3: 7, 5: 1}
    seen: list[int] = []
    bufs = pack_all(_packers(sizes), sizes, None, threads=2, progress=seen.append)
    assert set(bufs) == set(sizes)
    for u, n in sizes.items():
        assert bufs[u].numel() == n and bool((bufs[u] == u + 1).all())
    assert sorted(seen) == sorted(sizes.values())


@cuda
def test_pack_all_pins_in_place_and_release_unpins():
    sizes = {0: 1 << 20, 1: 3 << 20, 2: 12345}
    pins = PinnedSet()
    bufs = pack_all(_packers(sizes), sizes, pins, threads=3)
    assert len(pins) == 3 and all(b.is_pinned() for b in bufs.values())
    dev = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
    dev[: sizes[1]].copy_(bufs[1], non_blocking=True)
    torch.cuda.synchronize()
    assert bool((dev[: sizes[1]] == 2).all())
    pins.release()
    assert len(pins) == 0 and not any(b.is_pinned() for b in bufs.values())
    assert bool((bufs[2] == 3).all())  # still ordinary, valid host memory
    pins.release()  # idempotent


@cuda
def test_refused_registration_falls_back_to_a_pinned_copy():
    pins = PinnedSet()
    buf = torch.arange(4096, dtype=torch.int32)
    assert pins.pin(buf).data_ptr() == buf.data_ptr()
    with ThreadPoolExecutor(1) as pool:  # the same memory again: the driver refuses it
        again = pool.submit(pins.pin, buf).result()
    assert again.data_ptr() != buf.data_ptr() and again.is_pinned() and torch.equal(again, buf)
    assert torch.equal((torch.ones(4, device="cuda") * 2).cpu(), torch.full((4,), 2.0))  # no stale error
    pins.release()
    assert not buf.is_pinned()


@cuda
def test_collected_set_unregisters_its_buffers():
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    pins = PinnedSet()
    pins.pin(buf)
    assert buf.is_pinned()
    del pins
    gc.collect()
    assert not buf.is_pinned()


@cuda
def test_disk_ring_is_page_locked_by_its_thread_and_unlocked_on_close():
    reader = DiskReader(2, 4096, pin=True)
    reader.request(0, lambda buf: buf.fill_(7))
    buf = reader.get(0)
    assert buf.is_pinned() and bool((buf == 7).all())
    reader.copied(0, None)
    ring = list(reader.bufs)
    reader.close()
    assert not any(b.is_pinned() for b in ring)
