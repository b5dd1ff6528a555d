"""Mutation fuzzing of what a user hands the engine: every run must end with exit 0 or one ``error:`` line
(exit 2), never a traceback, a hang or a silently wrong load.

    PYTHONPATH=. python bench/fuzz_inputs.py --surface gguf --runs 200 --seed 1 [--model FILE]
    PYTHONPATH=. python bench/fuzz_inputs.py --surface config|quant|safetensors|cli --runs 200

Surfaces (each mutates a copy; nothing the user owns is touched):
  gguf         a GGUF file's header: structural fields (value and array element types, array counts,
               tensor dims / types / offsets) set to edge values, or random bytes in the metadata
               (default file: the real SmolLM2 Q4_1 the tests cache, else a tiny one written here)
  config       config.json / generation_config.json / tokenizer_config.json of the embedded default
               model: keys deleted or set to values of other JSON types, broken chat templates
  quant        quantization_config of tiny synthetic AWQ / GPTQ / compressed-tensors checkpoints
  safetensors  the default model's safetensors header: dtypes, shapes, data offsets, names
  cli          random combinations of ``layerstream`` flags and values on the default model
Each run is ``engine.run.main`` in this process with a 120 s alarm; the summary counts outcomes by
their message (numbers folded) and lists every run that broke the rule. Exit status 1 if any did.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import shutil
import signal
import struct
import tempfile
from collections import Counter
from pathlib import Path

from engine.run import main as run_main

VALUES = [None, True, False, 0, 1, -1, 2, 7, 1.5, -0.5, 1e30, "x", "", [], [1], {}, {"a": 1}, 2**40, "bf16", "llama",
          {"rope_type": "llama3"}, {"type": "yarn", "factor": 4.0}, [1016, "x"], 64, 255, 256]
TEMPLATES = ["{{ raise_exception('no') }}", "{% for m in messages %}", "{{ messages[5].content }}", "{{ 1/0 }}",
             "{{ foo.bar() }}", "{{ ''.__class__ }}", "{% for i in range(10**9) %}x{% endfor %}"]
SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(b: bytes) -> list[tuple[str, int, int]]:
    """(kind, offset, size) of a GGUF header's structural fields."""
    out, pos = [], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)

    def string(p: int) -> int:
        return p + 8 + struct.unpack_from("<Q", b, p)[0]

    def value(p: int, vtype: int) -> int:
        if vtype in SCALARS:
            return p + SCALARS[vtype]
        if vtype == 8:
            return string(p)
        etype, count = struct.unpack_from("<IQ", b, p)
        out.extend([("etype", p, 4), ("count", p + 4, 8)])
        p += 12
        if etype in SCALARS:
            return p + count * SCALARS[etype]
        for _ in range(count):
            p = value(p, etype)
        return p
    for _ in range(n_kv):
        p = string(pos)
        out.append(("vtype", p, 4))
        pos = value(p + 4, struct.unpack_from("<I", b, p)[0])
    for _ in range(n_tensors):
        p = string(pos)
        n_dims = struct.unpack_from("<I", b, p)[0]
        out += [("ndims", p, 4)] + [("dim", p + 4 + 8 * d, 8) for d in range(n_dims)]
        q = p + 4 + 8 * n_dims
        out += [("ttype", q, 4), ("toff", q + 4, 8)]
        pos = q + 12
    return out


def mutate_gguf(rng: random.Random, src: bytes, fields, data_start: int) -> bytes:
    b = bytearray(src)
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.7:
            _, off, size = rng.choice(fields)
            v = rng.choice([0, 1, 2, 3, 8, 9, 12, 13, 30, 255, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])
            b[off:off + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
        else:
            b[rng.randrange(0, data_start)] = rng.randrange(256)
    return bytes(b)


def mutate_json(rng: random.Random, d: dict, keys: list[str]) -> str:
    key = rng.choice(list(d) + keys)
    if rng.random() < 0.15:
        d.pop(key, None)
        return f"{key} deleted"
    d[key] = rng.choice(TEMPLATES) if key == "chat_template" and rng.random() < 0.5 else rng.choice(VALUES)
    return f"{key}={d[key]!r}"


def edit_json(path: Path, edit) -> str:
    d = json.loads(path.read_text())
    what = edit(d)
    path.write_text(json.dumps(d))
    return f"{path.name}: {what}"


def mutate_safetensors(rng: random.Random, path: Path) -> str:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    t, field = header[name], rng.choice(["dtype", "shape", "data_offsets", "name"])
    if field == "dtype":
        t["dtype"] = rng.choice(["F8_E4M3", "I8", "F64", "X", "F16", "F32", 3, None])
    elif field == "shape":
        t["shape"] = rng.choice([[], [0], [-1, 4], [2**40, 2**40], t["shape"][::-1], [1] + t["shape"], "x", [1.5]])
    elif field == "data_offsets":
        a, e = t["data_offsets"]
        t["data_offsets"] = rng.choice([[e, a], [a, a], [a + 2, e + 2], [0, 2**62], [-5, e], [a], "x"])
    else:
        header[name + "x"] = header.pop(name)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return f"{name}.{field}"


CLI_FLAGS = {
    "--max-new-tokens": ["1", "3", "0", "-1", "x"], "--temperature": ["0", "0.7", "inf"], "--top-k": ["0", "5"],
    "--top-p": ["1", "1e-9"], "--min-p": ["0", "0.999"], "--repetition-penalty": ["1", "1e-9", "1e9"],
    "--seed": ["0", "-1", str(2**64), str(2**64 - 1)], "--stop": ["a", "\n"], "--dtype": ["bf16", "fp16", "fp32"],
    "--kernels": ["torch", "triton"], "--vram-budget": ["100MB", "1MB", "1TB"], "--host-budget": ["1MB", "1TB"],
    "--max-context": ["2", "3", "16", "100", "1000000"], "--batch": ["1", "3"], "--prefill-chunk": ["1", "7"],
    "--prefill-states": ["vram", "host"], "--quantize": ["int8", "int4"], "--quant-group": ["-1", "32", "7"],
    "--host-compute": ["auto", "off", "2"], "--system": ["Be brief.", "\udcff"], "--prompt": ["hi", "", "caf\udce9"],
    "--no-chat": None, "--json": None, "--show-plan": None,
}


class Case:
    """One surface's source files and how to make a mutated copy of them."""

    def __init__(self, surface: str, work: Path, gguf: Path | None) -> None:
        from engine.resolve import default_model_dir
        from engine.synth.writer import synthesize

        self.surface, self.work = surface, work
        self.default = default_model_dir() if (default_model_dir() / "config.json").is_file() else \
            synthesize("default", work / "default", dtype="bf16", seed=0)
        if surface == "gguf":
            if gguf is None:
                from engine.gguf.writer import write_gguf
                gguf = write_gguf(self.default, work / "tiny.gguf", "Q8_0")[0]
            self.gguf = gguf.read_bytes()
            self.fields = gguf_fields(self.gguf)
            self.data_start = min(off for kind, off, _ in self.fields if kind == "ndims")
        if surface == "quant":
            self.quant = {q: synthesize("tiny-qwen2", work / f"q-{q}", quant=q, seed=1)
                          for q in ("awq", "gptq", "ct-int4")}

    def make(self, rng: random.Random) -> tuple[list[str], str]:
        """(argv for engine.run.main, what was mutated)."""
        base = ["--prompt", "hi", "--max-new-tokens", "2", "--max-context", "256"]
        if self.surface == "cli":
            argv = ["--model", str(self.default), "--prompt", "hello", "--max-new-tokens", "8"]
            for f in rng.sample(list(CLI_FLAGS), rng.randint(1, 5)):
                argv += [f] if CLI_FLAGS[f] is None else [f, rng.choice(CLI_FLAGS[f])]
            return argv, " ".join(argv[6:])
        d = self.work / "m"
        shutil.rmtree(d, ignore_errors=True)
        if self.surface == "gguf":
            d.mkdir()
            (d / "m.gguf").write_bytes(mutate_gguf(rng, self.gguf, self.fields, self.data_start))
            return ["--model", str(d / "m.gguf"), *base], "header"
        src = rng.choice(list(self.quant.values())) if self.surface == "quant" else self.default
        shutil.copytree(src, d)
        if self.surface == "safetensors":
            return ["--model", str(d), *base], mutate_safetensors(rng, d / "model.safetensors")
        if self.surface == "quant":
            return ["--model", str(d), *base], edit_json(d / "config.json", lambda c: mutate_json(
                rng, c["quantization_config"], ["bits", "group_size", "sym", "desc_act", "zero_point", "version"]))
        name = rng.choice(["config.json"] * 4 + ["generation_config.json", "tokenizer_config.json"])
        extra = ["rope_scaling", "head_dim", "attention_bias", "quantization_config", "chat_template"]
        return ["--model", str(d), *base], edit_json(d / name, lambda c: mutate_json(rng, c, extra))


def run_one(argv: list[str]) -> tuple[bool, str]:
    """(kept the rule, the outcome's message with numbers folded)."""
    err = io.StringIO()

    def hang(*_):
        raise TimeoutError("no answer within 120 s")
    signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = run_main(argv)
    except BaseException as e:  # noqa: BLE001 (a fuzzer records whatever escapes)
        return False, f"{type(e).__name__}: {e}"[:200]
    finally:
        signal.alarm(0)
    text = err.getvalue()
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    ok = rc in (0, 2) and (rc == 0 or bool(errors)) and "Traceback" not in text
    message = errors[0] if errors else f"exit {rc}" if ok else text[-300:]
    return ok, re.sub(r"\d+", "N", re.sub(r"/\S+", "PATH", message))[:160]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--surface", choices=["gguf", "config", "quant", "safetensors", "cli"], required=True)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="--surface gguf: the file to mutate")
    a = p.parse_args()
    rng, outcomes, broken = random.Random(a.seed), Counter(), []
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        case = Case(a.surface, Path(tmp), a.model)
        for i in range(a.runs):
            argv, what = case.make(rng)
            ok, message = run_one(argv)
            outcomes[message] += 1
            if not ok:
                broken.append(f"run {i} ({what}): {message}")
    print(f"{a.surface}: {a.runs} runs (seed {a.seed}), {len(broken)} broke the rule")
    for message, n in outcomes.most_common():
        print(f"{n:5d}  {message}")
    for line in broken:
        print("BROKE", line)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
