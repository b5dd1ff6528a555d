"""kernels/pdl.py: programmatic dependent launch for the decode step's kernels (``LAYERSTREAM_PDL=1``). A kernel
launched with ``launch_pdl=True`` must wait for the kernel before it before touching memory: every kernel taking
``PDL_CHAIN`` begins with ``pdl_enter(PDL_CHAIN)``, and ``pdl_opts`` (the only way a launch gets ``launch_pdl``
here, besides attention's own pass 2) gives the constexpr and the option together; compiled for sm_90 on the CPU,
``enter`` is a griddepcontrol.wait then griddepcontrol.launch_dependents, before any global load."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton

from kernels import pdl

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _kernels_taking_the_flag() -> dict[str, ast.FunctionDef]:
    found = {}
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(a.arg == "PDL_CHAIN" for a in node.args.args):
                found[f"{path.name}:{node.name}"] = node
    return found


def test_every_kernel_taking_the_flag_enters_first():
    found = _kernels_taking_the_flag()
    names = {k.split(":")[1] for k in found}
    assert {"_qgemv_kernel", "_qgemv_i8_kernel", "_quant_x_kernel", "_add_rmsnorm_kernel", "_add_rmsnorm_i8_kernel",
            "_rope_kv_append_kernel", "_attention_decode_kernel", "_gemv_kernel", "_rmsnorm_kernel"} <= names
    for name, fn in found.items():
        if name == "pdl.py:enter":
            continue
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        first = ast.unparse(body[0])
        assert first == "pdl_enter(PDL_CHAIN)", (name, first)


def test_launch_pdl_only_with_the_wait():
    """Every ``launch_pdl`` in the kernels comes from pdl_opts (PDL_CHAIN with it), or is attention's pass 2
    (which waits itself)."""
    for path in KERNELS.glob("*.py"):
        for i, line in enumerate(path.read_text().splitlines()):
            if "launch_pdl" in line and path.name != "pdl.py":
                assert path.name == "attention_decode.py" and "if pdl" in line, f"{path.name}:{i + 1}: {line}"


def test_opts(monkeypatch):
    from types import SimpleNamespace
    t = torch.zeros(1)
    assert pdl.opts(t) == {}  # off in the interpreter, and never on a CPU tensor
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.opts(t) == {}
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    for cap, want in (((9, 0), {"PDL_CHAIN": True, "launch_pdl": True}), ((8, 9), {})):
        pdl._capable.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx, c=cap: c)
        assert pdl.opts(on_gpu) == want
    pdl._capable.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx: (9, 4))  # an MI300 under ROCm
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert pdl.opts(on_gpu) == {}
    pdl._capable.cache_clear()


MARKS = ("griddepcontrol.wait", "griddepcontrol.launch_dependents", "ld.global")


def _ptx_marks(fn, ptrs: dict[str, str], meta: dict) -> list[int]:
    """Where each of MARKS first appears in ``fn``'s sm_90 PTX body (-1: nowhere)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **meta}  # defaults
    sig = {a: "constexpr" if a in meta else ptrs.get(a, "fp32" if a == "eps" else "i32") for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(a),): v for a, v in meta.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    return [body.find(m) for m in MARKS]


def report() -> None:
    """Run with TRITON_INTERPRET=0: one JSON line of marks per case (the test below reads them)."""
    import json

    from kernels.qgemv_i8 import _qgemv_i8_kernel
    from kernels.rmsnorm import _rmsnorm_kernel
    bf16 = {a: "*bf16" for a in _rmsnorm_kernel.arg_names if a.endswith("_ptr")}
    i8 = {"xq_ptr": "*i32", "d_ptr": "*fp32", "qs_ptr": "*i32", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
          "b_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    gemv = dict(HAS_ZEROS=True, HAS_MINS=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1,
                TICKET=False, ONE_GROUP=False, GROUP_C=128, EVEN_K=True, STAGES=1, ASM=True)
    cases = {"norm chain": (_rmsnorm_kernel, bf16, {"BLOCK_R": 1, "BLOCK_N": 4096, "PDL_CHAIN": True}),
             "norm plain": (_rmsnorm_kernel, bf16, {"BLOCK_R": 1, "BLOCK_N": 4096, "PDL_CHAIN": False}),
             "gemv chain": (_qgemv_i8_kernel, i8, {**gemv, "PDL_CHAIN": True})}
    print(json.dumps({name: _ptx_marks(*case) for name, case in cases.items()}))


def test_the_wait_comes_before_any_load_on_sm90():
    """Compiled for sm_90 on the CPU: with PDL_CHAIN the wait, then the trigger, then the first global load (the
    norm and the int8-x GEMV); without it neither."""
    import json
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(KERNELS.parent)}
    out = subprocess.run([sys.executable, "-c", "from tests.test_pdl import report; report()"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("norm chain", "gemv chain"):
        wait, launch, load = got[name]
        assert 0 <= wait < launch < load, (name, got[name])
    assert got["norm plain"][:2] == [-1, -1] and got["norm plain"][2] >= 0
