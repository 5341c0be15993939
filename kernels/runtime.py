"""Where the kernels run: compiled for a GPU, or under Triton's CPU interpreter (fixed small tiles, tests only)."""

import os

import torch


def interpreting(t: torch.Tensor) -> bool:
    """True under the interpreter; a clear error for CPU tensors when the interpreter is off."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if t.device.type == "cpu" and not interpret:
        raise RuntimeError(
            "kernels: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 before "
            "triton is imported (importing `kernels` does this when no CUDA device exists)"
        )
    return interpret
