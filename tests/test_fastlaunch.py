"""kernels.fastlaunch: the key holds what Triton specializes on; off the GPU (the interpreter) every launch is
Triton's own; on the GPU the direct launches give Triton's results, a new specialization (a shape, an
unaligned address) going through Triton first."""

from __future__ import annotations

import pytest
import torch

from kernels import fastlaunch
from kernels.fastlaunch import FastKernel, _arg_key, _kw_key


def test_key_holds_each_specialization():
    x = torch.zeros(64)
    assert _arg_key(16) == 16 and _arg_key(17) != _arg_key(16) and _arg_key(1) == 1
    assert _arg_key(True) != _arg_key(1) and _arg_key(None) == (type(None), None)
    assert _arg_key(2.5) != _arg_key(0.5) and _arg_key(0.5) == _arg_key(0.5)  # a float may be a constexpr
    assert _arg_key(x) == (torch.float32, True)
    assert _arg_key(x[1:]) == (torch.float32, False)  # 4 bytes past an aligned base
    assert _arg_key(x[4:]) == (torch.float32, True)
    assert _arg_key(x.half()) != _arg_key(x)
    with pytest.raises(TypeError):
        _arg_key([1, 2])
    assert _kw_key(x) == _arg_key(x) and _kw_key(torch.float16) == (torch.dtype, torch.float16)
    with pytest.raises(TypeError):
        _kw_key([1, 2])  # unhashable: Triton's path


def test_descriptor_key_holds_shape_strides_and_block():
    desc = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    a = torch.zeros(32, 64, dtype=torch.bfloat16)
    k = _arg_key(desc(a, [32, 64], [64, 1], [16, 32]))
    assert k != _arg_key(desc(a[:16], [16, 64], [64, 1], [16, 32]))
    assert k != _arg_key(desc(a, [32, 64], [64, 1], [16, 64]))
    assert k == _arg_key(desc(a.clone(), [32, 64], [64, 1], [16, 32]))


class _Param:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default


class _Fn:
    """A stand-in for a JIT function: records its launches."""

    params = [_Param("x"), _Param("n"), _Param("BLOCK"), _Param("FLAG", False, True)]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.launches.append((grid, a, kw)) or "compiled"


def test_full_arguments_in_declaration_order_with_defaults():
    k = FastKernel(_Fn())
    assert k._full((1, 2), {"BLOCK": 64, "num_warps": 4}) == [1, 2, 64, False]
    assert k._full((1,), {"n": 3, "BLOCK": 8, "FLAG": True}) == [1, 3, 8, True]


def test_off_every_launch_is_tritons_own(monkeypatch):
    """Off (the default; always under the interpreter): ``k[grid]`` is the function's own launcher, nothing kept."""
    monkeypatch.setattr(fastlaunch, "_ENABLED", False)
    fn = _Fn()
    k = FastKernel(fn)
    before = dict(fastlaunch.STATS)
    for _ in range(3):
        assert k[(4,)](torch.zeros(4), 4, BLOCK=4) == "compiled"
    assert len(fn.launches) == 3 and fastlaunch.STATS == before and not k.kernels


def test_on_a_grid_function_goes_through_triton(monkeypatch):
    monkeypatch.setattr(fastlaunch, "_ENABLED", True)
    fn = _Fn()
    k = FastKernel(fn)
    before = fastlaunch.STATS["triton"]
    assert k[lambda meta: (1,)](torch.zeros(4), 4, BLOCK=4) == "compiled"  # a callable grid
    assert len(fn.launches) == 1 and fastlaunch.STATS["triton"] == before + 1 and not k.kernels


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(fastlaunch._knobs is None, reason="this Triton has no knobs: the direct path never runs")
def test_direct_launches_match_the_reference_on_cuda(monkeypatch):
    """swiglu and add_rmsnorm launched again and again over shapes and an unaligned view (the direct path turned
    on): each result equals the fp32 reference, the repeats go direct, each new specialization through Triton."""
    monkeypatch.setattr(fastlaunch, "_ENABLED", True)
    from kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref
    from kernels.swiglu import swiglu, swiglu_ref
    gen = torch.Generator(device="cuda").manual_seed(0)
    flat = torch.randn(33 * 4096 + 1, device="cuda", dtype=torch.bfloat16, generator=gen)
    cases = [flat[:33 * 4096].view(33, 4096), flat[:7 * 2048].view(7, 2048),
             flat[1:].view(33, 4096)]  # the last: contiguous, 2 bytes past an aligned address
    before = dict(fastlaunch.STATS)
    for _ in range(3):
        for gu in cases:
            torch.testing.assert_close(swiglu(gu).float(), swiglu_ref(gu), rtol=2e-2, atol=2e-2)
    x = torch.randn(17, 896, device="cuda", dtype=torch.bfloat16, generator=gen)
    res, w = torch.randn_like(x), torch.rand(896, device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        out, new_res = add_rmsnorm(x, res, w, 1e-6)
        ref_out, ref_res = add_rmsnorm_ref(x, res, w, 1e-6)
        torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(new_res.float(), ref_res, rtol=2e-2, atol=2e-2)
    assert fastlaunch.STATS["direct"] - before["direct"] >= 6  # the repeats of each shape
    torch.cuda.synchronize()
