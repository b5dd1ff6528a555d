"""engine.upload: host tensors onto the device, equal to their source (the GPU's pinned path: tests/test_gpu_serving.py)."""

from __future__ import annotations

import pytest
import torch

from engine.upload import copy_into, upload, upload_list


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
