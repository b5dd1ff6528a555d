"""kernels/cublas.py: a tuner's reference matmul leaves no cuBLAS workspace inside the engine's budget (two such
32 MiB workspaces had run a served pass at 6 GiB out of memory: session 30)."""

from __future__ import annotations

import pytest
import torch

from kernels.cublas import matmul_released, release_workspaces


def test_on_the_cpu_it_is_a_plain_matmul():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    torch.testing.assert_close(matmul_released(a, b), a @ b)
    release_workspaces()  # nothing to release: no error


@pytest.mark.cuda
def test_a_released_matmul_on_a_fresh_stream_leaves_only_its_output():
    a = torch.randn(64, 256, device="cuda")
    b = torch.randn(256, 128, device="cuda")
    grown = []
    for run in (lambda: a @ b, lambda: matmul_released(a, b)):  # the control first: a plain matmul keeps one
        release_workspaces()
        with torch.cuda.stream(torch.cuda.Stream()):  # a (handle, stream) pair without a workspace yet
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            out = run()
            torch.cuda.synchronize()
            grown.append(torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes())
            torch.testing.assert_close(out.cpu(), a.cpu() @ b.cpu(), rtol=1e-2, atol=1e-2)  # TF32 or not
            del out
    assert grown[0] >= 1 << 20, f"torch {torch.__version__} kept no cuBLAS workspace: the control means nothing"
    assert grown[1] == 0, grown
