"""Diagnose a quantized model's prefill and decode on the GPU (tests/test_quant_parity_gpu.py's GPU case).

A 2-layer synthetic model runs a 33-token prefill of 2 rows and 3 decode steps with the fp32 torch ops (the
reference), the bf16 torch ops and, twice in one engine, the bf16 Triton ops. Printed: each run's logits per
step against the reference, copied as each step returns and after the last (a tensor changed after it is
returned shows), the residual stream after every layer call and the logits (l / h) against the reference's,
and the Triton ops' outputs against the torch ops' on the same inputs (fp32 math for packed linears; in-place
ops: the tensors they write), those beyond ``--tol`` as they happen.

    python bench/quant_decode_check.py --kind awq      (GPU machine; synthesizes a 2-layer Qwen2.5-7B)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.op_check import checked, perturbed, rel as _rel  # noqa: E402

def _recorded(model, rec: list) -> None:
    """Keep a float copy of each decoder layer's (output, residual) and of each head's logits, in call order."""
    layer, head = model.layer, model.head

    def rec_layer(*a, **k):
        h, r = layer(*a, **k)
        rec.append(("layer", (h.float() + r.float()).cpu()))  # the residual stream after the layer
        return h, r

    def rec_head(*a, **k):
        out = head(*a, **k)
        rec.append(("head", out.float().cpu()))
        return out
    model.layer, model.head = rec_layer, rec_head


def watched_attention(ops, notes: list) -> None:
    """Per decode call of ``ops.attention``: (largest |score|, smallest gap between a head's top two scores,
    that head's top probability), over rows and heads; a gap small against the scores' size is a near-tie
    that a small perturbation of q or k can flip (an ill-conditioned step)."""
    fn = ops.attention

    def attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len):
        if q.shape[1] == 1:
            hq, hk = q.shape[2], k_cache.shape[1]
            k = k_cache[:, :, :max_len].float().repeat_interleave(hq // hk, dim=1)  # [B, Hq, S, D]
            sc = torch.einsum("bhd,bhsd->bhs", q[:, 0].float(), k) * scale
            valid = torch.arange(max_len, device=q.device).view(1, 1, -1) <= start_pos.long().view(-1, 1, 1)
            sc = sc.masked_fill(~valid, float("-inf"))
            top = sc.topk(2, dim=-1).values
            p1 = torch.softmax(sc, dim=-1).amax(dim=-1)
            gap = (top[..., 0] - top[..., 1]).masked_fill(p1 < 0.5, float("inf"))  # dominant heads only
            notes.append((sc[valid.expand_as(sc)].abs().max().item(), gap.min().item(),
                          p1.flatten()[gap.flatten().argmin()].item()))
        return fn(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
    ops.attention = attention


_ATTN_NOTES: list = []  # the fp32 reference's decode attention: (max |score|, smallest top-2 gap, top prob)


def trajectory(d, ids: torch.Tensor, device: str, dtype: str, triton: bool, log: list | None, tol: float,
               rounds: int = 1, host_compute: str = "off", noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Per round: {"at_once": logits copied as each step returns, "later": copied after the last step,
    "trace": the recorded layer outputs and logits}; a prefill of 33 tokens x 2 rows and 3 decode steps."""
    from engine.engine import Engine, EngineOptions
    from engine.kv_cache import KVCache
    from engine.ops import TorchOps
    from engine.ops_triton import TritonOps
    from tests.helpers import forward_decode, forward_prefill
    eng = Engine(d, EngineOptions(device=device, dtype=dtype, kernels="triton", max_context=192, cuda_graph=False,
                                  host_compute=host_compute))
    eng.model.ops = TritonOps() if triton else TorchOps()
    if log is not None:
        checked(eng.model.ops, TorchOps(), tol, log)
    if noise:
        perturbed(eng.model.ops, noise, seed)
    if dtype == "fp32":
        watched_attention(eng.model.ops, _ATTN_NOTES)
    out = []
    for _ in range(rounds):
        trace: list = []
        _recorded(eng.model, trace)
        cache = KVCache(eng.cfg, 2, 192, eng.model.dtype, device)
        steps = [forward_prefill(eng.model, cache, ids[:, :33], last_only=False)]
        at_once = [steps[0].float().cpu()]
        for t in range(33, 36):
            steps.append(forward_decode(eng.model, cache, ids[:, t], t))
            at_once.append(steps[-1].float().cpu())
        out.append({"at_once": at_once, "later": [x.float().cpu() for x in steps], "trace": trace})
        del eng.model.layer, eng.model.head  # the instance attributes: the class's methods again
    eng.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="awq")
    p.add_argument("--preset", default="qwen2.5-7b")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--triton-first", action="store_true",
                   help="run the Triton engine before the torch ones (is an earlier engine's teardown involved?)")
    p.add_argument("--host-compute", default="off", help="the engines' host_compute (EngineOptions' default: off)")
    p.add_argument("--model-dir", default="", help="the synthetic model's folder, kept (reused when it exists)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (TRITON_INTERPRET=1, tiny presets)")
    p.add_argument("--perturb", type=int, default=0,
                   help="also run the bf16 torch ops this many times with every linear's output perturbed by "
                        "--noise (relative, seeded): the spread of each step's logits error (an ill-conditioned step?)")
    p.add_argument("--noise", type=float, default=3e-3, help="relative size of --perturb's noise")
    args = p.parse_args(argv)
    os.environ.setdefault("LAYERSTREAM_INT8_X", "0")  # as the parity test: the kernels without x's int8 rounding
    from engine.synth.writer import synthesize
    d = args.model_dir or os.path.join(tempfile.mkdtemp(), args.kind)
    if not os.path.exists(os.path.join(d, "config.json")):
        d = synthesize(args.preset, d, quant=args.kind, layers=2, device=args.device)
    ids = torch.randint(0, 1000, (2, 160), generator=torch.Generator().manual_seed(1)).to(args.device)
    log: list = []
    runs = {}
    if args.triton_first:
        runs["bf16 triton"], runs["bf16 triton, 2nd round"] = trajectory(d, ids, args.device, "bf16", True, log,
                                                                         args.tol, rounds=2,
                                                                         host_compute=args.host_compute)
    ref = trajectory(d, ids, args.device, "fp32", False, None, args.tol, host_compute=args.host_compute)[0]
    runs["bf16 torch"] = trajectory(d, ids, args.device, "bf16", False, None, args.tol,
                                    host_compute=args.host_compute)[0]
    if not args.triton_first:
        runs["bf16 triton"], runs["bf16 triton, 2nd round"] = trajectory(d, ids, args.device, "bf16", True, log,
                                                                         args.tol, rounds=2,
                                                                         host_compute=args.host_compute)
    for i in range(args.perturb):
        runs[f"bf16 torch, noise {i}"] = trajectory(d, ids, args.device, "bf16", False, None, args.tol,
                                                   host_compute=args.host_compute, noise=args.noise, seed=i)[0]
    for name, r in runs.items():
        print(f"{name:24} logits vs fp32 torch per step: "
              + ", ".join(f"{_rel(a, b):.4f}" for a, b in zip(r["at_once"], ref["at_once"]))
              + " | copied later vs at once: "
              + ", ".join(f"{_rel(a, b):.1e}" for a, b in zip(r["later"], r["at_once"])))
        print(f"{'':24} recorded vs fp32 torch: " + " ".join(
            f"{a[0][0]}{_rel(a[1], b[1]):.4f}" for a, b in zip(r["trace"], ref["trace"])))
    layers = len(_ATTN_NOTES) // 3
    for step in range(3):
        print(f"fp32 decode step {step + 1} attention per layer (max |score|, smallest top-2 gap of a head whose top "
              "probability > 0.5, that probability): " + "; ".join(
                  f"l{i} {m:.1f} {g:.3f} {p:.2f}" for i, (m, g, p) in enumerate(_ATTN_NOTES[step * layers:
                                                                                           (step + 1) * layers])))
    worst = sorted(log, key=lambda e: -e[0])[:8]
    print("Triton ops against torch ops on the same inputs, largest differences:\n"
          + "\n".join(f"  {e:.3e} {w}" for e, w in worst))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
