"""Model presets for the synthetic-checkpoint tool (``engine.synth``, CLI ``tools.synth``).

``PRESETS`` maps a preset name to the ``config.json`` dict of the real Hugging Face model
(values as published for the repo named in ``ALIASES``).  ``PRESET_FAMILY`` names the family
whose metadata in ``FAMILIES`` gives the special tokens (content, ``special`` flag) laid out
contiguously from ``special_base`` (their real ids), the tokenizer settings, the chat
template and the ``generation_config.json`` values.

Tiny presets (``tiny-*`` and ``default``) carry ``vocab_size: None``: the synthesizer puts
the family's special tokens right after the small trained BPE vocabulary ("relocates" them)
and rewrites every token id of the config / generation config accordingly.
"""

from __future__ import annotations

from typing import Any

QWEN_SPECIAL_BASE = 151643
LLAMA3_SPECIAL_BASE = 128000

_QWEN25_SPECIALS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]  # ids 151643 .. 151664
_QWEN3_SPECIALS = _QWEN25_SPECIALS + [
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]  # ids 151643 .. 151668


def _llama3_specials() -> list[tuple[str, bool]]:
    """The 256 Llama-3 special tokens, ids 128000 .. 128255."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]
    return [(t, True) for t in named + reserved]


# Chat templates (own wording; they render what the families' official templates render for
# plain system/user/assistant conversations, and Qwen2.5's for tools: the functions offered in the system
# turn, an assistant's calls as <tool_call> blocks, tool results as <tool_response> blocks in a user turn).
_QWEN25_TOOLS_INTRO = (
    "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>")
_QWEN25_TOOLS_OUTRO = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call>")
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set sys_text = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' ~ sys_text -}}"
    "{%- if tools -%}{{- '" + _QWEN25_TOOLS_INTRO + "' -}}"
    "{%- for t in tools -%}{{- '\\n' ~ (t | tojson) -}}{%- endfor -%}"
    "{{- '" + _QWEN25_TOOLS_OUTRO + "' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'assistant' and m.tool_calls is defined and m.tool_calls -%}"
    "{{- '<|im_start|>assistant' -}}{%- if m['content'] -%}{{- '\\n' ~ m['content'] -}}{%- endif -%}"
    "{%- for c in m.tool_calls -%}{%- set f = c.function if c.function is defined else c -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' ~ f.name ~ '\", \"arguments\": ' ~ (f.arguments | tojson) ~ '}\\n</tool_call>' -}}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or turns[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' ~ m['content'] ~ '\\n</tool_response>' -}}"
    "{%- if loop.last or turns[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set text = m['content'] if m['content'] is string else '' -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in text -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ text ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if date_string is not defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys_text = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set sys_text = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' ~ date_string ~ '\\n\\n' -}}"
    "{{- sys_text ~ '<|eot_id|>' -}}"
    "{%- for m in turns -%}"
    "{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- set ns = namespace(sys='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.sys = m['content'] ~ '\\n\\n' -%}"
    "{%- elif m['role'] == 'user' -%}{{- '[INST] ' ~ ns.sys ~ m['content'] ~ ' [/INST]' -}}{%- set ns.sys = '' -%}"
    "{%- else -%}{{- m['content'] ~ eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

_QWEN_TOKENIZER = {
    "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
    "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
    "split_special_tokens": False,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2.5": {
        "specials": _QWEN25_SPECIALS, "special_base": QWEN_SPECIAL_BASE, "pretokenizer": "qwen",
        "bos_prepend": None, "tokenizer_config": _QWEN_TOKENIZER, "chat_template": QWEN25_CHAT_TEMPLATE,
        "generation": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                       "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                       "temperature": 0.7, "top_p": 0.8, "top_k": 20},
    },
    "qwen3": {
        "specials": _QWEN3_SPECIALS, "special_base": QWEN_SPECIAL_BASE, "pretokenizer": "qwen",
        "bos_prepend": None, "tokenizer_config": _QWEN_TOKENIZER, "chat_template": QWEN3_CHAT_TEMPLATE,
        "generation": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                       "eos_token_id": [151645, 151643], "temperature": 0.6, "top_k": 20, "top_p": 0.95},
    },
    "llama3.1": {
        "specials": _llama3_specials(), "special_base": LLAMA3_SPECIAL_BASE, "pretokenizer": "llama3",
        "bos_prepend": "<|begin_of_text|>", "chat_template": LLAMA31_CHAT_TEMPLATE,
        # clean_up_tokenization_spaces is True in the real file; transformers 5 ignores it (with a
        # warning) for BPE tokenizers, and it would corrupt decoded text, so it is off here.
        "tokenizer_config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                             "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False,
                             "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072},
        "generation": {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                       "temperature": 0.6, "top_p": 0.9},
    },
    "mistral": {  # tiny test family only: byte-level BPE instead of Mistral's sentencepiece model
        "specials": [("<unk>", True), ("<s>", True), ("</s>", True)], "special_base": 0,
        "pretokenizer": "llama3", "bos_prepend": "<s>", "chat_template": MISTRAL_CHAT_TEMPLATE,
        "tokenizer_config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                             "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 32768},
        "generation": {"bos_token_id": 1, "eos_token_id": 2},
    },
}


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool,
            window_layers: int, sliding_window: int, vocab: int | None) -> dict[str, Any]:
    """config.json of a Qwen2.5-Instruct model."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": inter, "max_position_embeddings": 32768, "max_window_layers": window_layers,
        "model_type": "qwen2", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": sliding_window, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
    }


def _qwen3(hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool,
           head_dim: int = 128, vocab: int | None = 151936) -> dict[str, Any]:
    """config.json of a Qwen3 dense model."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": head_dim, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": inter,
        "max_position_embeddings": 40960, "max_window_layers": layers, "model_type": "qwen3",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": vocab,
    }


def _llama31(hidden: int, inter: int, layers: int, heads: int, kv: int,
             vocab: int | None = 128256) -> dict[str, Any]:
    """config.json of a Llama-3.1-Instruct model."""
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": inter,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": vocab,
    }


def _tiny_mistral() -> dict[str, Any]:
    """A 3-layer MistralForCausalLM (Mistral-7B-v0.3 style: no sliding window)."""
    return {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 3,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": None,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True, 21, 32768, 151936),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True, 21, 32768, 151936),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, True, 70, 32768, 151936),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, 28, 131072, 152064),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, False, 70, 131072, 152064),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, False, 70, 131072, 152064),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8, False, 80, 131072, 152064),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, False),
    "llama-3.1-8b": _llama31(4096, 14336, 32, 32, 8),
    "llama-3.1-70b": _llama31(8192, 28672, 80, 64, 8),
    # tiny test presets (vocab_size None: computed from the synthetic tokenizer)
    "tiny-qwen2": _qwen25(64, 160, 3, 4, 2, False, 3, 32768, None),
    "tiny-qwen2-tied": _qwen25(64, 160, 3, 4, 2, True, 3, 32768, None),
    "tiny-qwen3": _qwen3(64, 160, 3, 4, 2, False, head_dim=32, vocab=None),
    "tiny-llama": _llama31(64, 160, 3, 4, 2, vocab=None),
    "tiny-mistral": _tiny_mistral(),
    # the engine's embedded demo model: Qwen2.5-shaped, ChatML, runs on a CPU
    "default": _qwen25(256, 704, 4, 4, 2, False, 4, 32768, None),
}

PRESET_FAMILY: dict[str, str] = {
    name: ("qwen2.5" if cfg["model_type"] == "qwen2" else "qwen3" if cfg["model_type"] == "qwen3"
           else "llama3.1" if cfg["model_type"] == "llama" else "mistral")
    for name, cfg in PRESETS.items()
}

# generation_config.json differences inside a family
GENERATION_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {"repetition_penalty": 1.1},
    "qwen2.5-1.5b": {"repetition_penalty": 1.1},
}

ALIASES: dict[str, str] = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
}


def is_tiny(preset: str) -> bool:
    """True for presets whose vocabulary is sized from the synthetic tokenizer."""
    return PRESETS[preset]["vocab_size"] is None


def resolve_preset(name: str) -> str | None:
    """Map a preset name or an HF repo id from ``ALIASES`` (case-insensitive) to a preset name."""
    key = name.strip().lower()
    if key in PRESETS:
        return key
    return next((p for p, repo in ALIASES.items() if repo.lower() == key), None)
