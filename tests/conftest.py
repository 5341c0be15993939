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

from helpers import SHAKESPEARE  # noqa: E402  (after the environment above: helpers imports megagpt)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """Tiny Shakespeare's input.txt: ../shared's copy, else the one shipped inside data_prep, decompressed once."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    import gzip

    from data_prep.shakespeare import embedded_copy

    path = tmp_path_factory.mktemp("shakespeare") / "input.txt"
    path.write_bytes(gzip.decompress(embedded_copy().read_bytes()))
    return path


@pytest.fixture(scope="session")
def shakespeare_dataset(shakespeare_path, tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared once per test session (char level, 90/10 split)."""
    import data_prep

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    data_prep.prepare_shakespeare(out, shakespeare_path)
    return out


@pytest.fixture(scope="session")
def zero3_two_ranks(shakespeare_dataset, tmp_path_factory):
    """2 ranks under one torchrun agent, ZeRO 3, 8 steps of dist_helpers' QUIET settings (accumulation 1), an
    evaluation of the trained engine at the last step. One launch for two files: test_distributed checks it against
    one process, test_export exports it (a 2-rank launch is 8-15 s of CI)."""
    from types import SimpleNamespace

    from dist_helpers import finish, tiny, torchrun

    root = tmp_path_factory.mktemp("zero3")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))  # where DeepSpeed would build its ops
        launcher = torchrun(root / "run", tiny(shakespeare_dataset, global_batch_tokens=4 * 32 * 2, zero_stage=3), 2)
    finish(launcher)
    return SimpleNamespace(dir=root / "run", launcher=launcher, extensions=root / "torch_extensions")
