"""Fused Triton kernels for GPT training: causal attention and LayerNorm, with plain-torch references.

Imports only torch and triton; knows nothing of GPT. Without a CUDA device the kernels run under Triton's CPU
interpreter on CPU tensors (slow: for tests, not for training).
"""

import os
import sys

import torch

# FOOTGUN: triton reads TRITON_INTERPRET when each @triton.jit function is defined, its own (tl.sum, tl.max)
# included, so it must be set before anything imports triton. Without CUDA the interpreter is the only way the
# kernels can run; after a late setting, every kernel call would fail deep in the interpreter.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError("kernels: triton was imported before kernels on a machine without CUDA, so Triton's "
                          "interpreter is off; import kernels first, or set TRITON_INTERPRET=1 before starting")
    os.environ["TRITON_INTERPRET"] = "1"

from kernels import reference  # noqa: E402
from kernels.attention import causal_attention, dropout_keep_mask  # noqa: E402
from kernels.layer_norm import layer_norm  # noqa: E402

__all__ = ["causal_attention", "dropout_keep_mask", "layer_norm", "reference"]
