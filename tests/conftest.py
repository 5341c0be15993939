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


@pytest.fixture(scope="session")
def shakespeare_dataset(shakespeare_path, tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared once per test session (char level, 90/10 split)."""
    import data_prep

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    data_prep.prepare_shakespeare(out, shakespeare_path)
    return out


TINY_MODEL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "model.dropout=0.0",
]


def tiny_overrides(dataset_dir: Path, **train) -> list[str]:
    """A tiny GPT on a prepared dataset, quiet and quick: the base of most trainer tests."""
    values = {
        "micro_batch_size": 8,
        "max_steps": 20,
        "eval_interval": 10,
        "eval_steps": 2,
        "log_interval": 1,
        "checkpoint_interval": 10,
        "sample_tokens": 16,
        "warmup_steps": 5,
        "threads": 1,
    }
    values.update(train)
    return [
        *TINY_MODEL,
        f"data.dataset_dir={dataset_dir}",
        "data.prepare=none",
        "logging.progress_bar=false",
        *(f"train.{k}={v}" for k, v in values.items()),
    ]
