"""Model configuration: a frozen dataclass with Hugging Face field names.

Built from a checkpoint's ``config.json``; unknown keys are ignored, derived values
(head_dim, GQA group size, which optional tensors exist) are computed and checked in
``__post_init__`` so the rest of the engine can trust them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> family tag used to pick optional tensors (biases, q/k norms)
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "mistral"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# config.json keys this engine reads -> (check, what the value should be); None passes where the field allows it
_KEY_TYPES: dict[str, tuple[Any, str]] = {
    **{k: (_is_int, "an integer") for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "vocab_size", "max_position_embeddings")},
    **{k: (lambda v: v is None or _is_int(v), "an integer or null") for k in ("num_key_value_heads", "head_dim",
                                                                            "bos_token_id")},
    **{k: (_is_number, "a number") for k in ("rms_norm_eps", "rope_theta")},
    "rope_scaling": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "attention_bias": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("model_type", "hidden_act")},
    "torch_dtype": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "eos_token_id": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                     "an integer, a list of integers or null"),
    "architectures": (lambda v: v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v)),
                      "a list of strings"),
}


def check_key_types(raw: dict[str, Any]) -> None:
    """ValueError naming the first key of ``raw`` (a config.json) whose value has the wrong JSON type."""
    for key, (ok, what) in _KEY_TYPES.items():
        if key in raw and not ok(raw[key]):
            raise ValueError(f"config.json: {key} should be {what}, got {raw[key]!r}; fix the file or download "
                             "it again")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer config (Qwen2/2.5, Qwen3 dense, Llama 2/3/3.1, Mistral)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    architectures: tuple[str, ...] = field(default_factory=tuple)
    sliding_window: int | None = None
    use_sliding_window: bool | None = None  # Qwen2 / Qwen3: whether ``sliding_window`` applies at all
    max_window_layers: int | None = None  # Qwen2 / Qwen3: the layers from this one on slide
    layer_types: tuple[str, ...] | None = None  # transformers >= 5: "full_attention" / "sliding_attention" a layer

    def __post_init__(self) -> None:
        family = SUPPORTED_MODEL_TYPES.get(self.model_type)
        if family is None:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: this engine runs "
                f"{sorted(SUPPORTED_MODEL_TYPES)} decoder-only checkpoints"
            )
        for arch in self.architectures:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ValueError(
                    f"unsupported architecture {arch!r}: supported are "
                    f"{sorted(SUPPORTED_ARCHITECTURES)}"
                )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"config.json: {name} must be positive, got {value}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is absent")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.attention_bias is None:  # Qwen2 always has q/k/v biases; others default to none
            object.__setattr__(self, "attention_bias", family == "qwen2")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if rope_type not in (None, "default", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}: supported are default and llama3")

    # ----- derived values -----
    @property
    def family(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    @property
    def has_qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def attention_window(self) -> int | None:
        """The sliding window some layer's attention is limited to, as transformers reads these fields (None: every
        layer attends to every earlier position): ``layer_types`` where given; Mistral's ``sliding_window`` for every
        layer; Qwen2 / Qwen3 only with ``use_sliding_window``, from layer ``max_window_layers`` on. Past it this
        engine's attention, which has no window, would silently differ: the context is held to it
        (engine.options.fit_context)."""
        w = self.sliding_window
        if not w:
            return None
        if self.layer_types is not None:
            return w if "sliding_attention" in self.layer_types else None
        if self.model_type == "mistral":
            return w
        if self.model_type in ("qwen2", "qwen3") and self.use_sliding_window:
            return w if (self.max_window_layers or 0) < self.num_hidden_layers else None
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict, keeping only known keys."""
        check_key_types(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "model_type" not in kwargs:
            raise ValueError("config.json has no 'model_type': is this a Hugging Face causal-LM checkpoint?")
        if "torch_dtype" not in kwargs and isinstance(raw.get("dtype"), str):
            kwargs["torch_dtype"] = raw["dtype"]
        rope = raw.get("rope_parameters")  # transformers >= 5 layout: theta and scaling in one dict
        if isinstance(rope, dict):
            if "rope_theta" not in kwargs and "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            if kwargs.get("rope_scaling") is None and rope.get("rope_type", rope.get("type")) not in (None, "default"):
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        kwargs["architectures"] = tuple(raw.get("architectures") or ())
        if isinstance(raw.get("layer_types"), list):
            kwargs["layer_types"] = tuple(raw["layer_types"])
        if kwargs.get("model_type") == "mistral" and "sliding_window" not in raw:
            kwargs["sliding_window"] = 4096  # transformers' MistralConfig default (Mistral-7B-v0.1's window)
        if kwargs["model_type"] not in SUPPORTED_MODEL_TYPES:  # before the key check: e.g. GPT-2 has n_embd
            raise ValueError(f"unsupported model_type {kwargs['model_type']!r}: this engine runs "
                             f"{sorted(SUPPORTED_MODEL_TYPES)} decoder-only checkpoints")
        if raw.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias is true (biases on the MLP's projections), which layerstream does "
                             "not support")
        if raw.get("attention_bias") and kwargs["model_type"] != "qwen2":
            raise ValueError(f"config.json: attention_bias is true, which for {kwargs['model_type']} means biases on "
                             "q/k/v and on o_proj; layerstream does not support an o_proj bias")
        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if n not in kwargs]
        if missing:
            raise ValueError(f"config.json is missing required keys {missing}")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json``; errors name the file and what to do."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory needs a Hugging Face config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the model") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(raw)
        except TypeError as e:  # wrong value types for known fields
            raise ValueError(f"{path}: {e}") from e
