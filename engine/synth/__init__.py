"""Synthetic random-weight checkpoints with the names, shapes, config and file layout of real models.

``presets`` holds the published configs, ``tokenizer`` the small byte-level BPE written beside the
weights, ``writer`` the safetensors writer; ``tools.synth`` is the command line over them.
"""
