"""megagpt.data: batch shapes, targets, the exact global window order, resume (also elastic), eval batches."""

import json
import tarfile

import numpy as np
import pytest
import torch

import data_prep
from megagpt.data import EvalWindows, TrainLoader, eval_batches
from megagpt.dataset import DataError, Dataset, load_manifest


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
    assert load_manifest(shakespeare).vocab_size == 65
    with pytest.raises(ValueError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match="manifest.json"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("resume_micro", [0, 6, 7, 14])  # micro-batches read before the save: 7 stops inside a step
def test_resume_at_any_micro_batch_yields_identical_batches(shakespeare, resume_micro):
    ref = TrainLoader(shakespeare, 16, 4, grad_accum_steps=2, seed=5)
    expected = [next(ref) for _ in range(resume_micro + 8)][resume_micro:]
    first = TrainLoader(shakespeare, 16, 4, grad_accum_steps=2, seed=5)
    for _ in range(resume_micro):
        next(first)
    state = first.state_dict()
    assert (state["windows_consumed"], state["micro_batches_into_step"]) == (resume_micro // 2 * 8, resume_micro % 2)
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


# ---------------------------------------------------------------- random corpora, several uneven shards

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?\n"


def _random_dataset(tmp_path, n_chars=6000, shard_size_mb=0.0015, sample_tokens=97, seed=None):
    """A char dataset of random text: every window of 8+ tokens is unique, shards are small and uneven."""
    rng = np.random.default_rng(seed)
    text = "".join(rng.choice(list(ALPHABET), n_chars))
    (tmp_path / "corpus.txt").write_text(text)
    settings = data_prep.PrepSettings(shard_size_mb=shard_size_mb, sample_tokens=sample_tokens,
                                      chunk_chars=1000)
    out = data_prep.prepare([tmp_path / "corpus.txt"], tmp_path / "ds", settings)
    chars = sorted(set(text))
    train = np.array([chars.index(c) for c in text[: int(len(text) * 0.9)]])
    return out, train


def _window_index(train, block_size):
    """Expected windows (independent of the loader): tokens [i*B, i*B+B+1) of the train text, by content."""
    n = (len(train) - 1) // block_size
    index = {train[i * block_size:i * block_size + block_size + 1].tobytes(): i for i in range(n)}
    assert len(index) == n  # random text: windows are unique
    return index


def _ids(batch, index):
    x, y = batch
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    return [index[row.tobytes()] for row in rows]


def _global_order(loaders, steps, accum, index):
    """Window ids in global position order: per step, rank 0's accum micro-batches, then rank 1's, ..."""
    order = []
    for _ in range(steps):
        for loader in loaders:
            for _ in range(accum):
                order += _ids(next(loader), index)
    return order


@pytest.fixture(scope="module")
def random_ds(tmp_path_factory):
    return _random_dataset(tmp_path_factory.mktemp("rand"))


def test_the_random_dataset_has_several_uneven_shards(random_ds):
    tokens = [s.tokens for s in Dataset(random_ds[0]).shards("train")]
    assert len(tokens) >= 4 and len(set(tokens)) >= 2


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_epoch_covers_every_window_exactly_once(random_ds, world_size):
    out, train = random_ds
    B, mb, accum = 8, 3, 2
    index = _window_index(train, B)
    loaders = [TrainLoader(out, B, mb, accum, rank=r, world_size=world_size, seed=11)
               for r in range(world_size)]
    G = mb * accum * world_size
    steps = -(-len(index) // G)  # the epoch ends inside the last step: the rest is the next epoch's
    order = _global_order(loaders, steps, accum, index)
    assert sorted(order[: len(index)]) == list(range(len(index)))
    assert order[: len(index)] != sorted(order[: len(index)])  # shuffled
    assert {ld.state_dict()["windows_consumed"] for ld in loaders} == {steps * G}


def test_every_rank_yields_the_same_number_of_eval_batches(random_ds):
    out, _ = random_ds
    counts = [len(list(eval_batches(out, "val", 8, 4, 5, rank=r, world_size=3))) for r in range(3)]
    assert counts == [5, 5, 5]


def test_next_epoch_is_a_different_permutation(random_ds):
    out, train = random_ds
    index = _window_index(train, 16)
    n = len(index)
    loader = TrainLoader(out, 16, 1, seed=3)
    order = [_ids(next(loader), index)[0] for _ in range(2 * n)]
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n)) and order[:n] != order[n:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_run_matches_the_uninterrupted_run(random_ds, num_workers):
    out, _ = random_ds
    resume_step = int(np.random.default_rng(1001).integers(1, 30))
    ref = TrainLoader(out, 8, 4, grad_accum_steps=2, seed=7)
    expected = [next(ref) for _ in range(2 * (resume_step + 5))][2 * resume_step:]
    first = TrainLoader(out, 8, 4, grad_accum_steps=2, seed=7, num_workers=num_workers)
    for _ in range(2 * resume_step):
        next(first)
    resumed = TrainLoader(out, 8, 4, grad_accum_steps=2, seed=7, num_workers=num_workers)
    resumed.load_state_dict(first.state_dict())
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("new_world, new_accum", [(3, 2), (1, 6)])
def test_elastic_resume_on_another_world_size_still_covers_the_epoch_once(random_ds, new_world, new_accum):
    out, train = random_ds
    B, mb = 8, 2  # G = 12 windows per step at (W=2, accum=3), (W=3, accum=2) and (W=1, accum=6)
    index = _window_index(train, B)
    before = [TrainLoader(out, B, mb, 3, rank=r, world_size=2, seed=5) for r in range(2)]
    k = 7
    order = _global_order(before, k, 3, index)
    after = [TrainLoader(out, B, mb, new_accum, rank=r, world_size=new_world, seed=5)
             for r in range(new_world)]
    for loader in after:
        loader.load_state_dict(before[0].state_dict())
    order += _global_order(after, -(-len(index) // 12) - k, new_accum, index)
    assert sorted(order[: len(index)]) == list(range(len(index)))


def test_resume_with_another_global_batch_is_a_clear_error(random_ds):
    out, _ = random_ds
    loader = TrainLoader(out, 8, 4, grad_accum_steps=1)
    next(loader)
    other = TrainLoader(out, 8, 3, grad_accum_steps=1)
    with pytest.raises(ValueError, match="global batch"):
        other.load_state_dict(loader.state_dict())


# ---------------------------------------------------------------- bad data


def _copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_an_error_naming_it(random_ds, tmp_path):
    out = _copy_dataset(random_ds[0], tmp_path / "ds")
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    loader = TrainLoader(out, 8, 4)  # found when a batch first reads the shard (start-up touches no shard)
    with pytest.raises(DataError, match="train-000001.tar"):
        for _ in range(10_000):
            next(loader)


def test_checksum_mismatch_is_caught_before_its_tokens_are_used(random_ds, tmp_path):
    out = _copy_dataset(random_ds[0], tmp_path / "ds")
    shard = out / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] = (data[600] + 1) % 3  # inside the first payload: the tar still indexes fine, ids stay < vocab
    shard.write_bytes(bytes(data))
    loader = TrainLoader(out, 8, 64)  # every batch touches every shard
    with pytest.raises(DataError, match="train-000002.tar.*sha256"):
        next(loader)


def test_token_ids_beyond_the_vocabulary_are_an_error_naming_the_shard(random_ds, tmp_path):
    out = _copy_dataset(random_ds[0], tmp_path / "ds")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vocab_size"] = 10  # the shards hold ids up to ~68
    (out / "manifest.json").write_text(json.dumps(manifest))
    loader = TrainLoader(out, 8, 64)
    with pytest.raises(DataError, match=r"train-00000\d.tar: token id \d+ >= vocab_size 10"):
        next(loader)


def test_skip_mode_excludes_a_corrupt_shard_and_counts_it(random_ds, tmp_path, capsys):
    out = _copy_dataset(random_ds[0], tmp_path / "ds")
    shards = list(Dataset(out).shards("train"))
    (out / shards[1].name).write_bytes(b"garbage")
    loader = TrainLoader(out, 8, 4, on_corrupt_shard="skip")
    assert loader.skipped_shards == 1 and shards[1].name in capsys.readouterr().err
    kept = sum(s.tokens for s in shards) - shards[1].tokens
    assert loader.num_windows == (kept - 1) // 8
    # windows come from the other shards only: the kept token stream, read independently
    stream = np.concatenate([np.frombuffer(b"".join(_payloads(out / s.name)), "<u2")
                             for i, s in enumerate(shards) if i != 1])
    expected = {stream[i * 8:i * 8 + 9].tobytes() for i in range(loader.num_windows)}
    for _ in range(5):
        x, y = next(loader)
        rows = torch.cat([x, y[:, -1:]], 1).numpy().astype("<u2")
        assert all(row.tobytes() in expected for row in rows)


def test_skip_mode_leaves_a_corrupt_val_shard_out_of_evaluation_too(tmp_path, capsys):
    """data.on_corrupt_shard=skip used to cover the train split only: a run trained, then died at its first
    evaluation on the val shard it was told to skip."""
    out, _ = _random_dataset(tmp_path, shard_size_mb=0.0002, seed=1019)  # 97-token shards: 7 in val
    shards = list(Dataset(out).shards("val"))
    (out / shards[2].name).write_bytes(b"garbage")
    with pytest.raises(DataError, match=shards[2].name):
        list(eval_batches(out, "val", 8, 4, 40))
    windows = EvalWindows(out, "val", 8, on_corrupt_shard="skip")
    assert shards[2].name in capsys.readouterr().err
    stream = np.concatenate([np.frombuffer(b"".join(_payloads(out / s.name)), "<u2")
                             for i, s in enumerate(shards) if i != 2])  # read independently
    assert windows.windows.num_windows == (len(stream) - 1) // 8
    expected = {stream[i * 8:i * 8 + 9].tobytes() for i in range(windows.windows.num_windows)}
    for x, y in windows.batches(4, 40):
        rows = torch.cat([x, y[:, -1:]], 1).numpy().astype("<u2")
        assert all(row.tobytes() in expected for row in rows)


def _payloads(path):
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar]


# ---------------------------------------------------------------- streaming (URL shards)


def test_streaming_pipe_urls_yield_the_corpus_windows_and_resume_exactly(random_ds, tmp_path, capsys):
    out = _copy_dataset(random_ds[0], tmp_path / "ds")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shard_url"] = f"pipe:cat {out}/{{name}}"
    (out / "manifest.json").write_text(json.dumps(manifest))
    train = random_ds[1]
    index = _window_index(train, 8)
    loaders = [TrainLoader(out, 8, 3, rank=r, world_size=2) for r in range(2)]
    order = _global_order(loaders, 5, 1, index)
    assert order == list(range(30))  # corpus order, rank slices interleaved per step
    resumed = TrainLoader(out, 8, 3, rank=1, world_size=2, num_workers=2, on_corrupt_shard="skip")
    assert "num_workers=2, on_corrupt_shard='skip' ignored: the train split is streamed" in capsys.readouterr().err
    resumed.load_state_dict(loaders[1].state_dict())
    assert _ids(next(resumed), index) == [33, 34, 35]


def test_a_val_split_at_urls_is_evaluated_in_corpus_order(random_ds, tmp_path):
    """It used to be opened as local files named 'pipe:cat ...': a run died at its first evaluation."""
    out = _copy_dataset(random_ds[0], tmp_path / "ds")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["shard_url"] = f"pipe:cat {out}/{{name}}"
    (out / "manifest.json").write_text(json.dumps(manifest))
    val = np.concatenate([np.frombuffer(b"".join(_payloads(out / f"val-{k:06d}.tar")), "<u2")
                          for k in range(manifest["splits"]["val"]["shards"])]).astype(np.int64)  # independently
    n = (len(val) - 1) // 8
    batches = list(eval_batches(out, "val", 8, 4, 12, rank=1, world_size=2))  # 96 positions: wraps around
    for b, (x, y) in enumerate(batches):
        windows = [(b * 2 + 1) * 4 + i for i in range(4)]
        assert [x[i].tolist() for i in range(4)] == [val[w % n * 8:w % n * 8 + 8].tolist() for w in windows]
        assert torch.equal(y[:, :-1], x[:, 1:])
    assert len(batches) == 12 and 12 * 2 * 4 > n


@pytest.mark.parametrize("changed", [{"seed": 6}, {"block_size": 17}])
def test_a_loader_state_from_other_data_settings_is_refused_with_the_way_out(shakespeare, changed):
    saved = TrainLoader(shakespeare, 16, 4, seed=5)
    next(saved)
    other = {"block_size": 16, "seed": 5, **changed}
    resumed = TrainLoader(shakespeare, other["block_size"], 4, seed=other["seed"])
    key, value = next(iter(changed.items()))
    with pytest.raises(DataError, match=rf"cannot resume the data order: saved {key}=\d+, now {value}; resume with "
                       r"the dataset and settings the checkpoint was trained with, or start a new --run-dir"):
        resumed.load_state_dict(saved.state_dict())
