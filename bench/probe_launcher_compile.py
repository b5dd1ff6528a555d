"""How long Triton's per-signature C launcher takes to compile (kernels/launchers.py), on this machine.

Triton 3.6 (the GPU machine's version) generates a C launcher for each kernel signature and compiles it
with the system's C compiler at the kernel's first launch. This generates the launcher source for a few
of this repo's kernel signatures with the installed Triton's ``make_launcher`` and times ``gcc -O3 -fPIC
-c`` on each (the link step needs the CUDA driver library, absent on a CPU machine, and is left out).
Needs a Triton that has ``triton.backends.nvidia.driver.make_launcher`` (3.6; newer ones generate no C).

    PYTHONPATH=<triton 3.6 site-packages> python bench/probe_launcher_compile.py
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sysconfig
import tempfile
import time

import triton
from triton.backends.nvidia import driver

# argument types of a few kernels' launches (pointers and scalars; constexprs are not passed)
SIGNATURES = {
    "qgemv (16 args)": ["*bf16", "*i32", "*fp16", "*fp16", "*bf16", "*bf16", "*fp32", "*i32"] + ["i32"] * 8,
    "rmsnorm (11 args)": ["*bf16"] * 3 + ["i32"] * 7 + ["fp32"],
    "swiglu (5 args)": ["*bf16", "*bf16", "i32", "i32", "i32"],
}


def main() -> None:
    if not hasattr(driver, "make_launcher"):
        raise SystemExit(f"error: Triton {triton.__version__} generates no C launcher (make_launcher missing)")
    inc = [os.path.join(os.path.dirname(driver.__file__), "include"), sysconfig.get_paths()["include"]]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, types in SIGNATURES.items():
            src = driver.make_launcher({}, dict(enumerate(types)), None)
            path = os.path.join(tmp, "launcher.c")
            with open(path, "w") as f:
                f.write(src)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run(["gcc", "-O3", "-fPIC", "-c", path, "-o", path + ".o", *(f"-I{i}" for i in inc)],
                               check=True)
                times.append(time.perf_counter() - t0)
            rows[name] = {"source_chars": len(src), "gcc_c_s": sorted(times)[1]}
            print(f"{name:20} {len(src):6} chars of C, gcc -O3 -c median of 3: {sorted(times)[1]:.2f} s")
    meta = {"triton": triton.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gcc": subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
            "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
