"""The quantized decode GEMV's GPU build, compiled for the H200's sm_90 on the CPU with Triton's bundled
ptxas (the interpreter never lowers it, and never runs its PTX ``lop3`` unpack, ``ASM``).

Every batch-1 "3d" candidate and the tensor-core "split" candidates compile with the ``lop3`` and spill
nothing; and the batch-1 loop, which is bound by instruction issue rather than by memory (H200,
session 11: 30-34% of copy bandwidth at every launch config swept, time tracking the loop's
instruction count), stays within an instruction budget per code.  The budget is a static property of
the compiled loop, not a timing.  For the int4 32x512 4-warp tile (the sweep's fastest for gate_up)
the loop took 9.1 (Triton 3.6, the GPU machine's) and 7.3 (Triton 3.9) instructions per code before
the ``lop3``, the constant group index and the folded offsets, and 5.8 and 6.2 with them; the tiles of
one 128-column group take 4.2-4.8.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import triton

from tests.test_kernels_ggml import NV_BIN, PTR, sm90_report

K, N, GROUP = 3584, 4608, 128
BUDGET = 7.0  # loop instructions per 4-bit code, batch 1, BLOCK_N 32 x BLOCK_K 512, 4 warps
GROUP_TILE_BUDGET = 5.0  # the same for the 128 x 128 tile (one group per row: scales once per row)


def _compile(meta: dict, warps: int, stages: int) -> tuple[str, str]:
    """(cuobjdump's resource line, the SASS) of kernels.qgemv's kernel for sm_90."""
    from kernels import qgemv as mod
    ptrs = {"x_ptr": PTR[torch.bfloat16], "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
            "b_ptr": PTR[torch.bfloat16], "out_ptr": PTR[torch.bfloat16], "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    return compile_sm90(mod._qgemv_kernel, ptrs, meta, warps, stages)


def compile_i8(rows: int, bn: int, bk: int, warps: int, stages: int, maxnreg: int | None = None) -> tuple[str, str]:
    """(cuobjdump's resource line, the SASS) of kernels/qgemv_i8.py's GEMV for sm_90: ``rows`` rows of x, int4
    g128 with zero points, bf16 out, no split-K; ``maxnreg``: the register cap (kernels.qgemv_candidates.config's)."""
    from kernels import qgemv_i8 as mod
    ptrs = {"xq_ptr": "*i32", "d_ptr": "*fp32", "qs_ptr": "*i32", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
            "b_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    meta = dict(HAS_ZEROS=True, HAS_MINS=False, HAS_BIAS=False, BLOCK_M=rows, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1,
                TICKET=False, ONE_GROUP=GROUP % bk == 0, GROUP_C=GROUP, EVEN_K=True, STAGES=stages, ASM=True,
                WORDS2D=mod.WORDS2D, TRANS=mod.TRANS)  # as launch_i8 passes them
    return compile_sm90(mod._qgemv_i8_kernel, ptrs, meta, warps, stages, maxnreg)


ALIGNED_INTS = ("N", "K", "group", "stride_qn", "stride_sn")


def compile_sm90(fn, ptrs: dict[str, str], meta: dict, warps: int, stages: int,
                 maxnreg: int | None = None, aligned_ints: tuple[str, ...] = ALIGNED_INTS) -> tuple[str, str]:
    """(cuobjdump's resource line, the SASS) of the Triton kernel ``fn`` for sm_90: pointer arguments typed by
    ``ptrs``, ``meta`` as its constexprs (kernels.pdl's flag off unless given), other arguments i32; pointers and
    the integer arguments named in ``aligned_ints`` 16-divisible (as Triton specializes them at a launch where they
    are); ``maxnreg``: a register cap."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    meta = {**defaults, "PDL_CHAIN": False, **meta}  # constexprs left out at their defaults; kernels.pdl's flag off
    meta = {a: v for a, v in meta.items() if a in names}
    sig = {a: "constexpr" if a in meta else ptrs.get(a, "i32") for a in names}
    aligned = [a for a in names if a in ptrs or a in aligned_ints]
    src = ASTSource(fn, sig, constexprs={(names.index(a),): v for a, v in meta.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={
        "num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage, sass = (subprocess.run([str(NV_BIN / "cuobjdump"), flag, str(cubin)], capture_output=True, text=True,
                                      check=True).stdout for flag in ("--dump-resource-usage", "-sass"))
    return next(line.strip() for line in usage.splitlines() if "REG:" in line), sass


def loop_instructions(sass: str) -> int:
    """Instructions of the longest loop (a backward branch's span) in cuobjdump's SASS."""
    return len(_loop_body(sass))


def _loop_body(sass: str) -> list[str]:
    """The instructions of the longest loop (a backward branch's span) in cuobjdump's SASS, addresses dropped."""
    ops = [(int(m.group(1), 16), re.sub(r"/\*[0-9a-f]+\*/", "", line).strip()) for line in sass.splitlines()
           if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+\S", line))]
    span = (0, -1)
    for addr, line in ops:
        target = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addr and addr - int(target.group(1), 16) > span[1] - span[0]:
            span = (int(target.group(1), 16), addr)
    return [line for a, line in ops if span[0] <= a <= span[1]]


def loads_after_first_dot(sass: str, dot: str = "IDP.4A") -> int:
    """Global loads the longest loop issues after its first ``dot`` instruction (which waits for the codes): each
    is a second wait on memory in the K step."""
    body = _loop_body(sass)
    first = next((i for i, line in enumerate(body) if dot in line), len(body))
    return sum(1 for line in body[first:] if re.match(r"(?:@!?P\d\s+)?LDG\.", line))


def load_use_distances(sass: str, opcode: str = "LDG.E.EF") -> list[int]:
    """For each load in the longest loop whose opcode is ``opcode`` (of any width; default: the evict-first loads,
    the weight's codes): how many instructions later (going round the loop) its destination registers next
    appear, where the warp waits for the load at the latest."""
    body, out = _loop_body(sass), []
    for i, line in enumerate(body):
        m = re.match(r"(?:@!?P\d\s+)?(\S+)\s+R(\d+),", line)
        if not m or re.sub(r"\.(128|64)$", "", m.group(1)) != opcode:
            continue
        width = 4 if m.group(1).endswith(".128") else 2 if m.group(1).endswith(".64") else 1
        regs = [f"R{int(m.group(2)) + r}" for r in range(width)]
        out.append(next(d for d in range(1, len(body) + 1)
                        if any(re.search(rf"\b{r}\b", body[(i + d) % len(body)]) for r in regs)))
    return out


def report() -> None:
    """One line per candidate: ``bits M=m BNxBK wW sS vV: <resource line> | loop L codes C`` (run with
    TRITON_INTERPRET=0)."""
    from kernels import qgemv_candidates as cands
    from kernels.quant_common import scale_mode
    for bits, zeros in ((4, True), (8, False)):
        for block_m, shapes in ((1, [(s, False, 1) for s in cands._WORD_SHAPES]), (16, cands._SPLIT_SHAPES)):
            for item in shapes:
                (bn, bk, warps, stages), swap = item[0], item[1]
                mode, variant = scale_mode(GROUP, K, bk), 1 if block_m == 1 else 3
                meta = dict(HAS_ZEROS=zeros, HAS_MINS=False, HAS_BIAS=False, BITS=bits, IS_FP32=False, UPCAST=False,
                            BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, EVEN_K=True, SWAP_AB=swap,
                            TICKET=False, SCALE_MODE=mode, GROUP_C=GROUP if mode == 1 else 1, VARIANT=variant,
                            STAGES=stages, ASM=True)
                usage, sass = _compile(meta, warps, stages)
                codes = bn * bk // (32 * warps)
                print(f"int{bits} M={block_m} {bn}x{bk} w{warps} s{stages} v{variant}: {usage} | "
                      f"loop {loop_instructions(sass)} codes {codes}",
                      flush=True)


@pytest.mark.slow
@pytest.mark.skipif(not (NV_BIN / "cuobjdump").exists(), reason="Triton's NVIDIA tools are not bundled")
def test_qgemv_compiles_for_sm90_within_budget() -> None:
    lines = sm90_report("from tests.test_kernels_qgemv_sm90 import report; report()", timeout=900)
    from kernels import qgemv_candidates as cands
    assert len(lines) == 2 * (len(cands._WORD_SHAPES) + len(cands._SPLIT_SHAPES)), lines
    for line in lines:
        assert "STACK:0" in line and "LOCAL:0" in line, line
    for tile, budget in (("32x512 w4 s3", BUDGET), ("128x128 w4 s3", GROUP_TILE_BUDGET)):
        pick = next(line for line in lines if line.startswith(f"int4 M=1 {tile}"))
        loop, codes = (int(v) for v in re.search(r"loop (\d+) codes (\d+)", pick).groups())
        assert loop / codes <= budget, f"{loop / codes:.2f} instructions per code (budget {budget}): {pick}"


def test_loop_instructions_reads_the_longest_backward_branch() -> None:
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LOP3.LUT R2, R3, 0xf, R4, 0xea, !PT ;
        /*0020*/                   FFMA R5, R2, R6, R5 ;
        /*0030*/              @P0 BRA 0x10 ;
        /*0040*/                   FADD R5, R5, R7 ;
        /*0050*/                   BRA 0x40 ;
        /*0060*/                   EXIT ;
    """
    assert loop_instructions(sass) == 3


def test_load_use_distances_go_round_the_loop() -> None:
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0020*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.U16 R12, desc[UR4][R2.64] ;
        /*0040*/                   LOP3.LUT R8, R12, 0xf, RZ, 0xc0, !PT ;
        /*0050*/                   IDP.4A.S8.S8 R10, R6, R11, R10 ;
        /*0060*/              @P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
    """
    assert load_use_distances(sass) == [3]  # R6 (of R4-R7) is read three instructions later
    assert load_use_distances(sass.replace("EF.128 R4", "EF.64 R6")) == [3]
    assert load_use_distances(sass.replace("EF.128 R4", "EF.64 R4")) == [6]  # R4-R5 only
    assert load_use_distances(sass, "LDG.E.U16") == [1]
    assert load_use_distances(sass.replace("R6, R11", "R13, R11")) == [6]  # only its own reload: round the loop
