"""engine.upload: host tensors onto the device, equal to their source (the GPU's pinned path: tests/test_gpu_serving.py)."""

from __future__ import annotations

import pytest
import torch

from engine.upload import ALIGN, RING_BYTES, PinnedRing, copy_into, upload, upload_list


def test_upload_on_the_cpu_is_the_tensor():
    t = torch.arange(6, dtype=torch.long).view(2, 3)
    assert torch.equal(upload(t, torch.device("cpu")), t)
    out = upload_list([3, -1, 7], torch.int32, torch.device("cpu"))
    assert out.dtype == torch.int32 and out.tolist() == [3, -1, 7]
    dst = torch.zeros(2, 3, dtype=torch.long)
    copy_into(dst, t)
    assert torch.equal(dst, t)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_upload_through_pinned_memory_survives_the_source():
    dev = torch.device("cuda")
    outs = [upload_list(list(range(i, i + 1000)), torch.int32, dev) for i in range(50)]  # sources dropped at once
    torch.cuda.synchronize()
    assert all(o.tolist() == list(range(i, i + 1000)) for i, o in enumerate(outs))
    dst = torch.zeros(1000, dtype=torch.int32, device=dev)
    copy_into(dst, torch.arange(1000, dtype=torch.int32))
    torch.cuda.synchronize()
    assert dst.tolist() == list(range(1000))


class _Event:
    def __init__(self, log: list, stream: str) -> None:
        self.log, self.stream = log, stream

    def synchronize(self) -> None:
        self.log.append(("waited", self.stream))


def _ring(nbytes: int = 1024):
    log: list = []
    current = {"stream": "compute"}
    ring = PinnedRing(nbytes, buffer=torch.zeros(nbytes, dtype=torch.uint8), stream=lambda dev: current["stream"],
                      event=lambda s: (log.append(("recorded", s)), _Event(log, s))[1])
    return ring, log, current


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bfloat16, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (17,), (2, 1, 7), (), (0,), (0, 3)])
def test_ring_stages_the_values_in_its_buffer(dtype, shape):
    ring, _, _ = _ring()
    t = (torch.arange(int(torch.tensor(shape).prod())) % 100).to(dtype).view(shape)
    v = ring.stage(t, torch.device("cpu"))
    assert v.shape == t.shape and v.dtype == t.dtype and torch.equal(v, t)
    assert v.untyped_storage().data_ptr() == ring.buf.untyped_storage().data_ptr()  # in the ring, not a copy
    assert (v.data_ptr() - ring.buf.data_ptr()) % ALIGN == 0


def test_ring_takes_a_non_contiguous_tensor_and_keeps_earlier_views_intact():
    ring, _, _ = _ring()
    a = ring.stage(torch.arange(12).view(3, 4).t(), torch.device("cpu"))
    b = ring.stage(torch.full((5,), 7, dtype=torch.int32), torch.device("cpu"))
    assert torch.equal(a, torch.arange(12).view(3, 4).t()) and b.tolist() == [7] * 5


def test_ring_switches_halves_after_the_events_of_the_half_it_takes():
    ring, log, current = _ring(1024)  # halves of 512 bytes: 8 int64 values a staged tensor of 64 bytes
    dev = torch.device("cpu")
    for i in range(8):
        ring.stage(torch.full((8,), i), dev)  # fills the first half exactly
    assert ring.part == 0 and log == []
    current["stream"] = "side"
    ring.stage(torch.full((8,), 8), dev)  # does not fit: the first half's readers get an event, the second is fresh
    assert ring.part == 1 and log == [("recorded", "compute")]
    for i in range(7):
        ring.stage(torch.full((8,), 9 + i), dev)
    log.clear()
    ring.stage(torch.ones(8, dtype=torch.int64), dev)  # back to the first half: its events are waited for first
    assert ring.part == 0 and ring.switches == 2
    assert log == [("recorded", "side"), ("waited", "compute")]


def test_ring_leaves_a_tensor_larger_than_a_half_to_the_caller():
    ring, _, _ = _ring(1024)
    assert ring.stage(torch.zeros(513, dtype=torch.uint8), torch.device("cpu")) is None
    assert ring.stage(torch.zeros(512, dtype=torch.uint8), torch.device("cpu")) is not None


@pytest.mark.parametrize("nbytes", [0, 100, 130])
def test_ring_size_is_checked(nbytes):
    with pytest.raises(AssertionError):
        PinnedRing(nbytes, buffer=torch.zeros(max(nbytes, 1), dtype=torch.uint8), stream=lambda d: 0, event=None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uploads_past_the_ring_never_overwrite_bytes_still_to_be_copied(monkeypatch):
    from engine import upload as up
    monkeypatch.setattr(up, "_RING", up.PinnedRing(8 << 20))  # halves of 4 MiB
    dev = torch.device("cuda")
    torch.cuda._sleep(200_000_000)  # the device lags: the copies below queue behind it while the host stages
    n = 4096  # int32 values, 16 KiB a tensor: ~2.5 rings' worth in all
    outs = [up.upload_list(list(range(i, i + n)), torch.int32, dev) for i in range(1280)]
    torch.cuda.synchronize()
    assert up._RING.switches >= 4
    assert all(o[0].item() == i and o[-1].item() == i + n - 1 for i, o in enumerate(outs))
    assert all(torch.equal(outs[i], torch.arange(i, i + n, dtype=torch.int32, device=dev)) for i in range(0, 1280, 97))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staged_is_filled_where_the_copy_reads_it():
    from engine.upload import staged
    dev = torch.device("cuda")
    host = staged((300, 7), torch.bfloat16, dev)
    assert host is not None and host.is_pinned() and host.shape == (300, 7)
    src = torch.randn(300, 7).to(torch.bfloat16)
    host.copy_(src)
    assert torch.equal(host.to(dev, non_blocking=True).cpu(), src)
    assert staged((RING_BYTES,), torch.uint8, dev) is None  # larger than half the ring
    assert staged((4,), torch.int32, torch.device("cpu")) is None


def test_ring_take_gives_an_unfilled_view_of_the_shape_and_dtype():
    ring, _, _ = _ring()
    v = ring.take((3, 4), torch.float32, torch.device("cpu"))
    assert v.shape == (3, 4) and v.dtype == torch.float32 and v.is_contiguous()
    torch.index_select(torch.arange(40.0).view(10, 4), 0, torch.tensor([2, 0, 9]), out=v)
    assert v[:, 0].tolist() == [8.0, 0.0, 36.0]


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 5), (3, 1), (2, 7)])
def test_a_host_table_gathers_its_rows_into_the_staged_memory(monkeypatch, table_dtype, shape):
    """ModelWeights.embed with the table in host memory: the rows are gathered where the copy reads them (the ring),
    or, for a table of another dtype than the run's, gathered and converted first; either way the table's rows."""
    from types import SimpleNamespace

    import engine.weights as weights
    ring, _, _ = _ring(1 << 16)
    taken = []
    monkeypatch.setattr(weights, "staged", lambda s, dt, dev: taken.append(s) or ring.take(s, dt, dev))
    table = torch.randn(50, 6).to(table_dtype)
    me = SimpleNamespace(plan=SimpleNamespace(embed_on_device=False), embed_table=table, dtype=torch.bfloat16,
                         device=torch.device("cpu"))
    ids = torch.randint(0, 50, shape)
    out = weights.ModelWeights.embed(me, ids)
    assert out.dtype == torch.bfloat16 and out.shape == (*shape, 6)
    assert torch.equal(out, table[ids].to(torch.bfloat16))
    assert taken == ([(*shape, 6)] if table_dtype == torch.bfloat16 else [])


def test_with_the_ring_switched_off_nothing_is_staged(monkeypatch):
    from engine import upload as up
    monkeypatch.setattr(up, "RING", False)  # LAYERSTREAM_PINNED_RING=0: every upload pins through PyTorch
    assert up.staged((4,), torch.int32, torch.device("cuda")) is None
