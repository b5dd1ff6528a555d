"""layerstream's engine. ``from engine import LLM, SamplingParams`` for batch generation (see engine.llm).

The names are imported on first use (module ``__getattr__``), so ``import engine.run`` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {"LLM": "engine.llm", "RequestOutput": "engine.llm", "CompletionOutput": "engine.llm",
         "SamplingParams": "engine.serving.params"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
