"""Test setup: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is first imported, so it is done here, at
collection time, before any test module imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
