"""Shared helpers for the engine tests: tiny random Hugging Face models and our engine on top of them.

``make_hf_model`` builds a tiny random ``transformers`` model of one family, saves it as safetensors
(``save_pretrained``) together with a tokenizer copied from a synthesized tiny preset, and returns
the model (the reference) and the directory (what our engine loads). Weights are drawn larger than
the transformers default init (and norms / biases are randomised) so that logits are far from
uniform: greedy decoding then has clear winners and token comparisons are meaningful.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.engine import Engine, EngineOptions
from engine.graphs import DecodeGraph
from engine.kv_cache import KVCache
from engine.footprint import min_budget, plan_model
from engine.layout import LayerLayout, expected_tensors
from engine.model import Model
from engine.ops import TorchOps
from engine.weights import ModelWeights
from memory.placement import DISK_RING

# tiny model families built by make_hf_model (see hf_config)
FAMILIES = ("qwen2", "qwen2-tied", "qwen3", "llama", "llama3-rope", "mistral", "llama-gqa1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 96, 3, 4, 2
MAX_POS = 256
INIT_STD = 0.15


def tokenizer_size(tokenizer_dir: Path) -> int:
    """Number of token ids of the tokenizer in ``tokenizer_dir`` (added tokens included)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def vocab_for(tokenizer_dir: Path | None) -> int:
    """A vocab size >= 256 covering every id of the tokenizer, rounded up to 64."""
    n = tokenizer_size(tokenizer_dir) if tokenizer_dir is not None else 256
    return max(256, -(-n // 64) * 64)


def hf_config(family: str, vocab: int, tied: bool = False):
    """The transformers config of a tiny model of ``family`` (see ``FAMILIES``)."""
    import transformers

    common = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=vocab,
                  max_position_embeddings=MAX_POS, initializer_range=INIT_STD, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied or family == "qwen2-tied", bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if family in ("qwen2", "qwen2-tied"):
        return transformers.Qwen2Config(**common, rope_theta=1e6, use_sliding_window=False)
    if family == "qwen3":  # explicit head_dim: q_size = 4 * 32 = 128 != hidden 64
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1e6, attention_bias=False)
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if family == "llama-gqa1":  # one KV head shared by all 4 query heads
        return transformers.LlamaConfig(**{**common, "num_key_value_heads": 1}, rope_theta=50000.0)
    if family == "llama3-rope":
        # original_max_position_embeddings small enough that the prompts reach the scaled frequencies
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling)
    if family == "mistral":
        return transformers.MistralConfig(**common, head_dim=16, rope_theta=1e6, sliding_window=None)
    raise ValueError(f"unknown family {family!r}")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights around 1 and random biases (transformers initialises them to 1 / 0)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def linked_model(src: Path, dst: Path, **json_updates: dict) -> Path:
    """``dst``: ``src``'s files as symlinks, except the JSON files named (``config={...}`` for config.json,
    ``generation_config={...}``), written with those keys updated. Read-only use of ``src``."""
    dst.mkdir(parents=True, exist_ok=True)
    names = {f"{k}.json": v for k, v in json_updates.items()}
    for f in src.iterdir():
        if f.name in names:
            (dst / f.name).write_text(json.dumps({**json.loads(f.read_text()), **names[f.name]}))
        else:
            os.symlink(f, dst / f.name)
    return dst


def legacy_config(model_dir: Path) -> None:
    """Rewrite a transformers-5 config.json (``rope_parameters``) into the older layout that most Hub
    checkpoints use: ``rope_theta`` and ``rope_scaling`` at the top level."""
    path = Path(model_dir) / "config.json"
    raw = json.loads(path.read_text())
    rp = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rp.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    raw["rope_scaling"] = scaling if scaling.get("rope_type") not in (None, "default") else None
    path.write_text(json.dumps(raw, indent=2))


def make_hf_model(family: str, tmp_path: Path, tied: bool = False, dtype: torch.dtype = torch.float32,
                  tokenizer_dir: Path | None = None, seed: int = 0, legacy: bool = False):
    """Build, randomise and save a tiny transformers model; returns ``(model.eval(), model_dir)``.

    The directory holds config.json + model.safetensors (+ the tokenizer files of
    ``tokenizer_dir``, and vocab_size covers all its ids). ``legacy`` rewrites config.json in the
    pre-transformers-5 layout (top-level rope_theta / rope_scaling).
    """
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, vocab_for(tokenizer_dir), tied)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen2-tied": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM,
           "llama-gqa1": transformers.LlamaForCausalLM, "llama3-rope": transformers.LlamaForCausalLM,
           "mistral": transformers.MistralForCausalLM}[family]
    model = cls(cfg).to(torch.float32)
    _randomise(model, seed)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    out = Path(tmp_path) / f"{family}{'-tied' if tied else ''}{'-legacy' if legacy else ''}"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("generation_config.json",):  # ours reads eos ids from it; none wanted here
        (out / name).unlink(missing_ok=True)
    if legacy:
        legacy_config(out)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tokenizer_dir) / name, out / name)
    assert not list(out.glob("*.bin")), "save_pretrained wrote pickles"
    return model, out


# ----------------------------------------------------------------------------- our engine, by hand

@dataclass
class Loaded:
    cfg: ModelConfig
    ckpt: Checkpoint
    weights: ModelWeights
    model: Model
    plan: object


def plan_for(cfg: ModelConfig, ckpt: Checkpoint, kind: str = "resident", *, batch: int = 1,
             max_context: int = 64, prefill_chunk: int = 2048, dtype: torch.dtype = torch.float32):
    """A memory plan for ``kind``:

    * ``resident``: everything resident (no budget, no device memory figure: the CPU case);
    * ``stream-all``: the minimum budget: every layer and lm_head (in chunks) stream, pinned;
    * ``stream-partial``: one layer more than the minimum: one layer resident (the last: streamed
      layers are spread from layer 0), the rest streams;
    * ``disk-some``: everything streams, only one layer fits the host budget (beside the disk tier's ring): the
      others come from disk;
    * ``disk-all``: everything streams, host budget 0: every layer from disk.
    """
    tb = {n: i.nbytes for n, i in ckpt.tensors.items()}
    kw = dict(batch=batch, max_context=max_context, prefill_chunk=prefill_chunk)
    layer = LayerLayout.build(cfg, dtype).nbytes
    low = min_budget(cfg, dtype, **kw)
    budget, host = {"resident": (None, 1 << 30), "stream-all": (low, 1 << 30),
                    "stream-partial": (low + layer, 1 << 30), "disk-some": (low, (1 + DISK_RING) * layer),
                    "disk-all": (low, 0)}[kind]
    return plan_model(cfg, tb, dtype, vram_budget=budget, host_budget=host, **kw)


def load_ours(model_dir: Path, ops=None, plan: str = "resident", *, batch: int = 1, max_context: int = 64,
              dtype: torch.dtype = torch.float32) -> Loaded:
    """Our Checkpoint + ModelWeights + Model on the CPU, without the Engine wrapper."""
    cfg = ModelConfig.from_file(Path(model_dir) / "config.json")
    ckpt = Checkpoint(model_dir)
    ckpt.validate(expected_tensors(cfg))
    p = plan_for(cfg, ckpt, plan, batch=batch, max_context=max_context, dtype=dtype)
    wm = ModelWeights(ckpt, cfg, p, "cpu", dtype, threads=1)
    model = Model(cfg, wm, ops or TorchOps(), "cpu", dtype, max_context)
    return Loaded(cfg, ckpt, wm, model, p)


def i32(values, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def forward_prefill(model: Model, cache: KVCache, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """One pass over ids [B, T] (all rows real) from position 0."""
    b, t = ids.shape
    return model.forward(ids, i32([0] * b, ids.device), i32([t] * b, ids.device), cache, t, last_only=last_only)


def forward_decode(model: Model, cache: KVCache, tok: torch.Tensor, pos: int) -> torch.Tensor:
    """One decode step: tok [B] at position ``pos`` for every row; logits [B, V]."""
    b = tok.shape[0]
    return model.forward(tok.view(b, 1), i32([pos] * b, tok.device), i32([1] * b, tok.device), cache, pos + 1)


def greedy_cached(model: Model, cfg: ModelConfig, prompt: list[int], steps: int, max_context: int = 64) -> list[int]:
    """Greedy tokens with the KV cache, straight on Model.forward (batch 1)."""
    cache = KVCache(cfg, 1, max_context, torch.float32, "cpu")
    logits = forward_prefill(model, cache, torch.tensor([prompt]), last_only=True)
    out = []
    for s in range(steps):
        tok = logits.argmax(-1)
        out.append(int(tok))
        if s + 1 < steps:
            logits = forward_decode(model, cache, tok, len(prompt) + s)
    return out


def greedy_no_cache(model: Model, cfg: ModelConfig, prompt: list[int], steps: int, max_context: int = 64) -> list[int]:
    """Greedy tokens re-running the whole sequence every step (a fresh cache each time, last_only)."""
    seq = list(prompt)
    for _ in range(steps):
        cache = KVCache(cfg, 1, max_context, torch.float32, "cpu")
        logits = forward_prefill(model, cache, torch.tensor([seq]), last_only=True)
        seq.append(int(logits.argmax(-1)))
    return seq[len(prompt):]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens of a transformers model after ``prompt`` (eos ignored)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_engine(model_dir: Path, **opts) -> Engine:
    """An Engine on the CPU in fp32 with the torch kernels; generation never stops at eos."""
    base = dict(device="cpu", dtype="fp32", kernels="torch", max_context=64, threads=1, host_budget=1 << 30)
    engine = Engine(model_dir, EngineOptions(**{**base, **opts}))
    engine.tokenizer.eos_ids = set()  # compare fixed-length token streams
    return engine


def random_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def rel_max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    assert torch.isfinite(out).all(), "non-finite values in our logits"
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def dir_snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with (size, mtime_ns); {} when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            out[str(p.relative_to(path))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


class _Replay:
    """Stands in for a CUDA graph: replay re-runs the Python that was "captured"."""

    def __init__(self, fns) -> None:
        self.fns = fns

    def replay(self) -> None:
        for fn in self.fns:
            fn()


class CpuDecodeGraph(DecodeGraph):
    """DecodeGraph whose pieces re-run their Python on replay (no CUDA needed)."""

    captured: list[int]

    def _warm_up(self) -> None:
        self.captured = []

    def _graph(self, fns) -> _Replay:
        self.captured.append(len(fns))
        return _Replay(fns)
