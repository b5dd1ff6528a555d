"""Config options the engine does not implement are named in the error (they were refused as a checkpoint that does
not match its config.json, "unexpected tensors: ...o_proj.bias", which reads as a corrupt download)."""

from __future__ import annotations

import pytest

from engine.config import ModelConfig
from engine.options import LOAD_THREADS

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100}


@pytest.mark.parametrize("fields,match", [
    ({"model_type": "llama", "attention_bias": True}, "attention_bias is true, which for llama means biases on q/k/v "
                                                      "and on o_proj"),
    ({"model_type": "qwen3", "attention_bias": True}, "layerstream does not support an o_proj bias"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias is true"),
])
def test_an_unsupported_bias_is_named(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**BASE, **fields})


def test_qwen2s_own_biases_and_false_flags_load():
    assert ModelConfig.from_dict({**BASE, "model_type": "qwen2", "attention_bias": True}).attention_bias
    assert not ModelConfig.from_dict({**BASE, "model_type": "llama", "attention_bias": False,
                                      "mlp_bias": False}).attention_bias


def test_loading_threads_are_at_most_the_cpus():
    import os
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= LOAD_THREADS <= min(8, cpus)
