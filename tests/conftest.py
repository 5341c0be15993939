"""Test-wide setup: Triton's interpreter on CPU-only machines, the gpu marker, shared fixtures."""

import os
from pathlib import Path

import pytest

# Must happen before anything imports triton: without a GPU, kernels run under the interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cuda" if _HAS_CUDA else "cpu")

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare from ../shared; CI has no network, so skip cleanly when it is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE
