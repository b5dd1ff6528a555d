"""Quantized linear weights: the canonical layout (``spec``), round-to-nearest quantization
(``rtn``) and the loaders of published formats (AWQ, GPTQ, compressed-tensors)."""
