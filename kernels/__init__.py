"""Fused Triton kernels for GPT training: causal attention and LayerNorm, with plain-torch references.

Imports only torch and triton; knows nothing of GPT. Without a CUDA device the kernels run under Triton's CPU
interpreter on CPU tensors (slow: for tests, not for training).
"""

import os

import torch

# FOOTGUN: triton reads TRITON_INTERPRET when each @triton.jit function is defined, so it must be set before
# the kernel modules below are imported. Without CUDA the interpreter is the only way the kernels can run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import reference  # noqa: E402
from kernels.attention import causal_attention, dropout_keep_mask  # noqa: E402
from kernels.layer_norm import layer_norm  # noqa: E402

__all__ = ["causal_attention", "dropout_keep_mask", "layer_norm", "reference"]
