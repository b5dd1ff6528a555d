"""Op-level parity and conditioning probes (tests/test_quant_parity_gpu.py, bench/quant_decode_check.py).

``checked`` wraps an ops object so that every call is compared with a reference ops object on cloned inputs:
a kernel that disagrees shows at the op it sits in, whatever the model's conditioning. ``perturbed`` makes
every linear's output off by a seeded relative noise: run end to end, it shows how far a step's logits move
under op-sized differences (a near-tie in an attention softmax turns 0.3% into a logits error above 1).
"""
from __future__ import annotations

import torch

OPS = ("rmsnorm", "add_rmsnorm", "linear", "swiglu", "attention", "embedding", "rope_", "kv_append_")
MUTATED = {"rope_": (0, 1), "kv_append_": (2, 3)}  # in-place ops: the arguments they write


def rel(a, b) -> float:
    """Relative L2 (Frobenius) error of a against b (tuples: the largest)."""
    if isinstance(a, tuple):
        return max(rel(x, y) for x, y in zip(a, b))
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def checked(ops, ref_ops, tol: float, log: list, verbose: bool = True) -> None:
    """Wrap ``ops``'s methods in OPS: each call's output is compared with ``ref_ops`` on cloned inputs (packed
    linears: fp32 math on the dequantized weight); ``log`` gets (relative error, description) per call."""
    from engine.quant.spec import QuantWeight, dequantize
    for name in OPS:
        fn, ref_fn = getattr(ops, name), getattr(ref_ops, name)

        def wrapped(*args, _fn=fn, _ref=ref_fn, _name=name):
            ref_args = [_clone(a) for a in args]
            out = _fn(*args)
            if _name == "linear" and isinstance(args[1], QuantWeight):
                x, w = args[0], args[1]
                b = args[2] if len(args) > 2 else None
                dense = dequantize(w)
                ref = x.float().reshape(-1, x.shape[-1]) @ dense.T + (0 if b is None else b.float())
                err = rel(out.reshape(ref.shape), ref)
                what = f"qlinear x{tuple(x.shape)} {x.dtype} stride {x.stride()} " \
                       f"w[{w.qweight.shape[0]}, {w.in_features}] " \
                       f"bits {w.spec.bits} g {w.group_size} scales {w.scales.dtype} zeros " \
                       f"{None if w.zeros is None else w.zeros.dtype} bias {b is not None}"
            elif _name in MUTATED:
                _ref(*ref_args)
                err = max(rel(args[i], ref_args[i]) for i in MUTATED[_name])
                what = f"{_name} " + " ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            else:
                ref = _ref(*ref_args)
                err = rel(out, ref)
                what = f"{_name} " + " ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            log.append((err, what))
            if err > tol and verbose:
                print(f"  DIFF {err:.3e} {what}", flush=True)
            return out
        setattr(ops, name, wrapped)


def perturbed(ops, noise: float, seed: int) -> None:
    """Multiply each ``ops.linear`` output by (1 + noise * N(0, 1)) elementwise, seeded: how far a step's logits
    move when every linear is off by about ``noise`` (the Triton ops' distance from torch's on the same inputs)."""
    fn, gen = ops.linear, torch.Generator(device="cpu").manual_seed(seed)

    def linear(*args):
        out = fn(*args)
        e = torch.randn(out.shape, generator=gen).to(out.device, torch.float32)
        return (out.float() * (1 + noise * e)).to(out.dtype)
    ops.linear = linear
