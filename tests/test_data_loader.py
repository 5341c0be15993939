"""megagpt.data: batch shapes, targets, the exact global window order, resume (also elastic), eval batches."""

import numpy as np
import pytest
import torch

import data_prep
from megagpt.data import TrainLoader, eval_batches, load_manifest


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path, tmp_path_factory):
    return data_prep.prepare_shakespeare(tmp_path_factory.mktemp("d") / "sh", shakespeare_path)


def test_batches_are_long_tensors_and_y_is_x_shifted(shakespeare, shakespeare_path):
    text = shakespeare_path.read_text()
    chars = sorted(set(text))
    train_ids = np.array([chars.index(c) for c in text[: int(len(text) * 0.9)]])
    loader = TrainLoader(shakespeare, block_size=32, micro_batch_size=5)
    for _ in range(3):
        x, y = next(loader)
        assert x.shape == y.shape == (5, 32) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            # every row is a window of the train text starting at a multiple of block_size
            starts = np.flatnonzero(train_ids[: len(train_ids) - 32] == row_x[0])
            starts = [s for s in starts if s % 32 == 0 and np.array_equal(train_ids[s:s + 32], row_x)]
            assert len(starts) >= 1 and np.array_equal(train_ids[starts[0] + 1:starts[0] + 33], row_y)


def test_manifest_is_validated(shakespeare, tmp_path):
    assert load_manifest(shakespeare)["vocab_size"] == 65
    with pytest.raises(ValueError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match="manifest.json"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("resume_step", [0, 3, 7])
def test_resume_at_any_step_yields_identical_batches(shakespeare, resume_step):
    ref = TrainLoader(shakespeare, 16, 4, grad_accum_steps=2, seed=5)
    expected = [next(ref) for _ in range(2 * (resume_step + 4))][2 * resume_step:]
    first = TrainLoader(shakespeare, 16, 4, grad_accum_steps=2, seed=5)
    for _ in range(2 * resume_step):
        next(first)
    state = first.state_dict()
    assert state["windows_consumed"] == resume_step * 8
    resumed = TrainLoader(shakespeare, 16, 4, grad_accum_steps=2, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_one_process_with_accum_sees_the_windows_of_two_processes(shakespeare):
    single = TrainLoader(shakespeare, 16, 3, grad_accum_steps=2, world_size=1)
    ranks = [TrainLoader(shakespeare, 16, 3, grad_accum_steps=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        a, b = next(single), next(single)
        assert torch.equal(a[0], next(ranks[0])[0]) and torch.equal(b[0], next(ranks[1])[0])


def test_eval_batches_are_the_same_every_time(shakespeare):
    first = list(eval_batches(shakespeare, "val", 16, 4, 3))
    second = list(eval_batches(shakespeare, "val", 16, 4, 3))
    assert len(first) == 3
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_rank = list(eval_batches(shakespeare, "val", 16, 4, 3, rank=1, world_size=2))
    assert len(other_rank) == 3 and not torch.equal(other_rank[0][0], first[0][0])
