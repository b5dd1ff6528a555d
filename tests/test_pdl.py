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
        first = body[0]
        assert isinstance(first, ast.Expr) and ast.unparse(first) == "pdl_enter(PDL_CHAIN)", name


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
    assert pdl.opts(t) == {}  # off by default, and never on a CPU tensor
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.opts(t) == {}
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    for cap, want in (((9, 0), {"PDL_CHAIN": True, "launch_pdl": True}), ((8, 9), {})):
        pdl._CAPABLE.clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx, c=cap: c)
        assert pdl.opts(on_gpu) == want
    pdl._CAPABLE.clear()


SM90 = r'''
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.rmsnorm import _rmsnorm_kernel as k
for chain in (True, False):
    meta = {"BLOCK_R": 1, "BLOCK_N": 4096, "PDL_CHAIN": chain}
    sig = {a: "constexpr" if a in meta else "*bf16" if a.endswith("_ptr") else "fp32" if a == "eps" else "i32"
           for a in k.arg_names}
    src = ASTSource(k, sig, constexprs={(k.arg_names.index(a),): v for a, v in meta.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    print([body.find(s) for s in ("griddepcontrol.wait", "griddepcontrol.launch_dependents", "ld.global")])
'''


def test_enter_compiles_to_the_wait_before_any_load_on_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(KERNELS.parent)}
    out = subprocess.run([sys.executable, "-c", SM90], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wait, launch, load), plain = (eval(line) for line in out.stdout.strip().splitlines()[-2:])
    assert 0 <= wait < launch < load, (wait, launch, load)  # PDL_CHAIN: the wait, the trigger, then loads
    assert plain[:2] == [-1, -1] and plain[2] >= 0  # without it: neither
