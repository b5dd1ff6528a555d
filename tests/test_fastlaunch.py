"""kernels.fastlaunch: the key holds what Triton specializes on; off the GPU (the interpreter) every launch is
Triton's own; on the GPU the direct launches give Triton's results, a new specialization (a shape, an
unaligned address) going through Triton first."""

from __future__ import annotations

import pytest
import torch

from kernels import fastlaunch
from kernels.fastlaunch import FastKernel


def _keyed(fn) -> FastKernel:
    """A FastKernel whose device-0 specializer is CUDA's (no GPU needed to compute keys)."""
    k = FastKernel(fn)
    k.backends[0] = pytest.importorskip("triton.backends.nvidia.compiler").CUDABackend
    return k


def test_key_holds_what_triton_specializes_on():
    """Runtime integers by Triton's classes (1, multiples of 16, the rest; 32 / 64 bits), tensors by dtype and
    alignment, constexprs and launch options by value: a pass's new token count reuses the compiled kernel."""
    k = _keyed(_Fn())
    key = lambda *a, **kw: k.key(0, a, kw)  # noqa: E731
    x = torch.zeros(64)
    assert key(x, 100, BLOCK=64) == key(x, 116, BLOCK=64) == key(x, 3, BLOCK=64)  # none a multiple of 16, none 1
    assert key(x, 32, BLOCK=64) == key(x, 4096, BLOCK=64) != key(x, 100, BLOCK=64)
    assert key(x, 1, BLOCK=64) not in (key(x, 2, BLOCK=64), key(x, 16, BLOCK=64))
    assert key(x, 2**31 + 3, BLOCK=64) != key(x, 3, BLOCK=64)  # 64-bit
    assert key(x, 100, BLOCK=64) != key(x, 100, BLOCK=32)  # a constexpr by value
    assert key(x, 100, BLOCK=64, num_warps=4) != key(x, 100, BLOCK=64, num_warps=8)  # a launch option by value
    assert key(x[1:], 100, BLOCK=64) != key(x, 100, BLOCK=64) == key(x[4:], 100, BLOCK=64)  # 16-byte alignment
    assert key(x.half(), 100, BLOCK=64) != key(x, 100, BLOCK=64)
    assert key(x, 100, BLOCK=64, FLAG=True) != key(x, 100, BLOCK=64, FLAG=False)
    assert key(x, 100, BLOCK=0.0) != key(x, 100, BLOCK=-0.0)  # equal in Python, compiled apart by Triton
    assert len({key(x, 100, BLOCK=b) for b in [(1, 2), (True, 2), (1.0, 2)]}) == 3
    with pytest.raises(TypeError):
        key([1, 2], 100, BLOCK=64)
    with pytest.raises(TypeError):
        key(x, 100, BLOCK=[64])  # an unhashable constexpr: Triton's path


def test_descriptor_key_holds_dtype_and_block_not_shape():
    desc = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    k = _keyed(_Fn())
    a = torch.zeros(32, 64, dtype=torch.bfloat16)
    key = lambda d: k.key(0, (d, 7), {"BLOCK": 16})  # noqa: E731
    base = key(desc(a, [32, 64], [64, 1], [16, 32]))
    assert base == key(desc(a[:17], [17, 64], [64, 1], [16, 32]))  # another token count: the same kernel
    assert base != key(desc(a, [32, 64], [64, 1], [16, 64]))
    assert base != key(desc(a.half(), [32, 64], [64, 1], [16, 32]))


class _Param:
    def __init__(self, name, default=None, has_default=False, constexpr=False):
        self.name, self.default, self.has_default, self.is_constexpr = name, default, has_default, constexpr
        self.is_const = self.do_not_specialize = self.do_not_specialize_on_alignment = False


class _Fn:
    """A stand-in for a JIT function: records its launches."""

    params = [_Param("x"), _Param("n"), _Param("BLOCK", constexpr=True), _Param("FLAG", False, True, True)]

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
