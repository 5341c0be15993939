"""Data at scale (#17): the O(1) window order, lazy integrity checks, resumable prep after a kill, bounded
manifests and memory for huge inputs."""

import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import REPO

import data_prep
from data_prep.sources import iter_chunks
from data_prep.spm import MAX_LINE_CHARS, sample_lines
from megagpt.data import TrainLoader, WindowOrder
from megagpt.dataset import DataError, Dataset, verify_main

# ---------------------------------------------------------------- the window order


AWKWARD = [1, 2, 3, 5, 7, 31, 127, 255, 256, 257, 1023, 1024, 1025, 4093, 65535, 65536, 65537, 100_003]


@pytest.mark.parametrize("n", AWKWARD)
def test_the_order_is_a_permutation_for_awkward_sizes(n):
    seed = int(np.random.default_rng(1002).integers(2**31))
    order = WindowOrder(n, seed)
    for epoch in (0, 1, 7):
        ids = order.permute(epoch, np.arange(n))
        assert np.array_equal(np.sort(ids), np.arange(n)), (n, seed, epoch)
    if n >= 5:  # a shuffle, and another one in the next epoch
        assert not np.array_equal(order.permute(0, np.arange(n)), np.arange(n))
        assert not np.array_equal(order.permute(0, np.arange(n)), order.permute(1, np.arange(n)))


def test_the_order_of_any_positions_is_the_order_of_the_whole_epoch():
    """window_ids is a pure function of (seed, position): any subset, in any order, across epochs."""
    n = 1009
    order = WindowOrder(n, 42)
    full = np.concatenate([order.permute(e, np.arange(n)) for e in range(3)])
    positions = np.random.default_rng(1003).permutation(3 * n)[:500]
    assert np.array_equal(WindowOrder(n, 42).window_ids(positions), full[positions])
    order = WindowOrder(n, 42)
    for start in np.random.default_rng(1004).integers(0, 3 * n - 64, 20):  # runs of positions, as batches come
        assert np.array_equal(order.window_ids(np.arange(start, start + 64)), full[start:start + 64])


def _random_permutation_stats(p):
    """KS distance (scaled by sqrt(n)) of the consecutive-index distances |p[i+1]-p[i]| from their exact law under a
    uniform random permutation, P(D <= d) = (2dN - d(d+1)) / (N(N-1)); position/index and lag-1 correlations
    scaled by sqrt(N) (about standard normal for a random permutation)."""
    n = len(p)
    d = np.sort(np.abs(np.diff(p))).astype(np.float64)
    cdf = (2 * d * n - d * (d + 1)) / (n * (n - 1))
    m = len(d)
    ks = max(np.max(np.arange(1, m + 1) / m - cdf), np.max(cdf - np.arange(m) / m)) * np.sqrt(m)
    r = np.corrcoef(np.arange(n), p)[0, 1] * np.sqrt(n)
    lag = np.corrcoef(p[:-1], p[1:])[0, 1] * np.sqrt(n)
    return ks, r, lag


@pytest.mark.parametrize("n", [100_003, 65_536])
def test_the_order_mixes_like_a_random_permutation(n):
    """The same statistics as numpy's random permutation, and within the same bounds: Kolmogorov's median is 0.83
    and P(K > 3) ~ 3e-8; |z| > 5 has probability ~6e-7."""
    seeds = np.random.default_rng(1005).integers(2**31, size=12)
    for name, make in (("feistel", lambda s: WindowOrder(n, int(s)).permute(0, np.arange(n))),
                       ("numpy", lambda s: np.random.default_rng(int(s)).permutation(n))):
        stats = np.array([_random_permutation_stats(make(s)) for s in seeds])
        assert stats[:, 0].max() < 3.0 and 0.5 < np.median(stats[:, 0]) < 1.2, (name, seeds, stats[:, 0])
        assert np.abs(stats[:, 1:]).max() < 5.0, (name, seeds, stats[:, 1:])
    order = WindowOrder(n, int(seeds[0]))  # epochs are independent of each other
    r = np.corrcoef(order.permute(0, np.arange(n)), order.permute(1, np.arange(n)))[0, 1] * np.sqrt(n)
    assert abs(r) < 5.0


PEAK_BYTES = """
import sys, tracemalloc
import numpy as np
from megagpt.data import WindowOrder
for n in map(int, sys.argv[1:]):
    order, positions = WindowOrder(n, 3), (np.arange(64) + 5 * 10**12) % n
    order.window_ids(positions)  # first call: anything made once
    tracemalloc.start()
    ids = order.window_ids(positions)
    print(tracemalloc.get_traced_memory()[1], len(set(ids.tolist())), int(ids.max()))
    tracemalloc.stop()
"""


def test_the_order_costs_the_same_at_a_trillion_windows():
    """Nothing is materialised per epoch: a batch of positions anywhere allocates what the batch needs, at 10**3
    windows as at 10**12 (measured in bytes in a process of its own, where no other thread allocates; one process
    for both sizes, each measured on its own after a first call)."""
    sizes = (1000, 10**12 + 39)
    out = subprocess.run([sys.executable, "-c", PEAK_BYTES, *map(str, sizes)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = {}
    for n, line in zip(sizes, out.stdout.splitlines(), strict=True):
        peak, distinct, largest = map(int, line.split())
        assert distinct == 64 and largest < n
        peaks[n] = peak
    small, huge = peaks.values()
    assert huge < 2 * small + 4096 and small < 64 * 1024, peaks  # a few arrays of 64 positions, not the epoch


# ---------------------------------------------------------------- a small dataset of random text

ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?\n")


@pytest.fixture(scope="module")
def random_ds(tmp_path_factory):
    """A char dataset of random text (every window of 8+ tokens unique) in several small, uneven shards."""
    root = tmp_path_factory.mktemp("scale")
    text = "".join(np.random.default_rng(1006).choice(ALPHABET, 7000))
    (root / "corpus.txt").write_text(text)
    settings = data_prep.PrepSettings(shard_size_mb=0.0015, sample_tokens=97, chunk_chars=1000)
    out = data_prep.prepare([root / "corpus.txt"], root / "ds", settings)
    chars = sorted(set(text))
    train = np.array([chars.index(c) for c in text[: int(len(text) * 0.9)]])
    return out, train


def _window_of(train, block_size):
    n = (len(train) - 1) // block_size
    return {train[i * block_size:i * block_size + block_size + 1].tobytes(): i for i in range(n)}


def _global_order(dataset, world, accum, workers, steps, index, B=8, mb=2):
    loaders = [TrainLoader(dataset, B, mb, accum, rank=r, world_size=world, seed=9, num_workers=workers)
               for r in range(world)]
    order = []
    for _ in range(steps):
        for loader in loaders:
            for _ in range(accum):
                x, y = next(loader)
                rows = torch.cat([x, y[:, -1:]], 1).numpy()
                order += [index[row.tobytes()] for row in rows]
    return order


def test_the_global_order_is_the_same_for_every_world_size_and_worker_count(random_ds):
    out, train = random_ds
    index = _window_of(train, 8)
    reference = _global_order(out, 1, 12, 0, 4, index)  # G = 24 windows per step
    for world, accum, workers in ((2, 6, 0), (3, 4, 0), (4, 3, 0), (2, 6, 2)):
        assert _global_order(out, world, accum, workers, 4, index) == reference, (world, accum, workers)


def test_resume_across_an_epoch_boundary_on_another_world_size(random_ds):
    out, train = random_ds
    index = _window_of(train, 8)
    n = len(index)
    G = 24
    steps = -(-n // G) + 3  # past the end of the first epoch
    reference = _global_order(out, 1, 12, 0, steps, index)
    assert sorted(reference[:n]) == list(range(n)) and len(set(reference[n:])) == len(reference) - n
    before = TrainLoader(out, 8, 2, 12, seed=9)
    for _ in range(12 * (steps - 2)):
        next(before)
    after = [TrainLoader(out, 8, 2, 4, rank=r, world_size=3, seed=9) for r in range(3)]
    for loader in after:
        loader.load_state_dict(before.state_dict())
    tail = []
    for _ in range(2):
        for loader in after:
            for _ in range(4):
                x, y = next(loader)
                tail += [index[row.tobytes()] for row in torch.cat([x, y[:, -1:]], 1).numpy()]
    assert tail == reference[G * (steps - 2):]


# ---------------------------------------------------------------- integrity: when a damaged byte is found


def _damaged_copy(src, dst, name, where):
    """A copy of the dataset with one byte of `name` flipped at offset `where`."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / name
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    return dst


def test_a_flipped_payload_byte_is_found_at_its_first_read_and_named(random_ds, tmp_path):
    shard = Dataset(random_ds[0]).shards("train")[2]
    out = _damaged_copy(random_ds[0], tmp_path / "ds", shard.name, 512 + 3)  # member 0's payload
    loader = TrainLoader(out, 8, 2, seed=1)  # opening reads no shard: it succeeds
    with pytest.raises(DataError, match=f"{shard.name}: sha256 of member 0"):
        for _ in range(10_000):  # until a batch reads that member
            next(loader)


def test_a_flipped_header_byte_is_found_by_data_verify_and_named(random_ds, tmp_path, capsys):
    shard = Dataset(random_ds[0]).shards("train")[1]
    out = _damaged_copy(random_ds[0], tmp_path / "ds", shard.name, 100)  # member 0's tar header: never read
    loader = TrainLoader(out, 8, 2)
    for _ in range(200):
        next(loader)
    with pytest.raises(DataError, match="1 of"):
        verify_main([str(out)])
    assert f"{shard.name}: sha256" in capsys.readouterr().err
    assert verify_main([str(random_ds[0])]) == 0


def test_a_flipped_index_byte_is_found_when_the_shard_is_opened(random_ds, tmp_path):
    shard = Dataset(random_ds[0]).shards("train")[0]
    out = _damaged_copy(random_ds[0], tmp_path / "ds", shard.name.replace(".tar", ".idx"), 20)
    loader = TrainLoader(out, 8, 2)
    with pytest.raises(DataError, match=r"train-000000.idx: does not match the index_sha256"):
        for _ in range(10_000):
            next(loader)


def test_opening_reads_no_shard(random_ds, tmp_path):
    """What a process reads before its first batch: the manifest, the train split's shard table, and only the
    indexes and members that batch touches (audit hook on open)."""
    out = random_ds[0]
    opened = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], str | os.PathLike) and os.fspath(args[0]).startswith(str(out)):
            opened.append(os.path.basename(args[0]))

    sys.addaudithook(hook)
    loader = TrainLoader(out, 8, 1)
    at_open = list(opened)
    next(loader)
    opened_for_batch = set(opened) - set(at_open)
    opened.clear()
    assert sorted(at_open) == ["manifest.json", "train.shards.npy"]  # one file whatever the shard count
    at_open = [name for name in at_open if name.endswith((".tar", ".idx"))]
    assert at_open == []
    assert len([n for n in opened_for_batch if n.endswith(".tar")]) <= 2  # one window spans at most two shards


def test_a_shard_of_another_size_is_found_at_its_first_read_and_named(random_ds, tmp_path):
    """The identity check (one stat: the size prep recorded) happens when a process first reads the shard, not at
    start-up: a shard with one byte appended (its members intact, so only the size tells) is named then."""
    import shutil

    name = "train-000001.tar"
    out = shutil.copytree(random_ds[0], tmp_path / "ds")
    os.chmod(out / name, 0o644)
    with open(out / name, "ab") as f:
        f.write(b"\0")
    loader = TrainLoader(out, 8, 2, seed=1)  # start-up looks at no shard file: it succeeds
    with pytest.raises(DataError, match=rf"{name}: truncated or corrupt shard \(\d+ bytes, its shard table says"):
        for _ in range(10_000):  # until a batch reads that shard
            next(loader)


def test_a_damaged_shard_table_is_named_at_start_up_and_by_data_verify(random_ds, tmp_path, capsys):
    out = _damaged_copy(random_ds[0], tmp_path / "ds", "train.shards.npy", -5)  # the last shard's index hash
    with pytest.raises(DataError, match=r"train.shards.npy: does not match splits.train.table_sha256"):
        TrainLoader(out, 8, 2)
    with pytest.raises(DataError, match="1 of 2 shard tables"):
        verify_main([str(out)])
    assert "train.shards.npy: does not match" in capsys.readouterr().err


def _shard_facts(path, dtype="<u2"):
    """A shard's manifest entry, from its files alone (tarfile, hashlib): what prep must have recorded."""
    with tarfile.open(path) as tar:
        payloads = [tar.extractfile(m).read() for m in tar]
    tokens = np.frombuffer(b"".join(payloads), dtype)
    index = path.with_suffix(".idx").read_bytes()
    return {"name": path.name, "samples": len(payloads), "tokens": len(tokens), "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "index_sha256": hashlib.sha256(index).hexdigest(),
            "max_token": int(tokens.max(initial=0))}


def test_the_shard_table_holds_each_shards_facts_and_a_format_2_dataset_still_reads(random_ds, tmp_path):
    """The table records what the shard files hold; the same facts listed in a format-2 manifest (as datasets
    prepared before the tables have them) give the same batches and pass `megagpt data verify`."""
    import shutil

    out = shutil.copytree(random_ds[0], tmp_path / "v2")
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        facts = [_shard_facts(out / f"{split}-{k:06d}.tar") for k in range(info["shards"])]
        assert [s.model_dump() for s in Dataset(random_ds[0]).shards(split)] == facts
        manifest["splits"][split] = {"tokens": info["tokens"], "samples": info["samples"], "shards": facts}
        (out / f"{split}.shards.npy").unlink()
    manifest["format_version"] = 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    new, old = TrainLoader(random_ds[0], 8, 4, seed=3), TrainLoader(out, 8, 4, seed=3)
    for _ in range(20):
        assert all(torch.equal(a, b) for a, b in zip(next(new), next(old), strict=True))
    assert verify_main([str(out)]) == 0


def test_the_manifest_does_not_grow_with_the_shards(tmp_path):
    """10 or 1,000 shards: the manifest is the same size but for a few digits (the shard count, the settings);
    the shard table grows by one fixed-size record a shard."""
    (tmp_path / "c.txt").write_text("".join(np.random.default_rng(1007).choice(ALPHABET, 20_000)))
    manifest, table = {}, {}
    for shards in (10, 1000):
        settings = data_prep.PrepSettings(val_fraction=0.0, sample_tokens=20, chunk_chars=5000,
                                          shard_size_mb=20_000 // shards * 2 / 2**20)  # 2-byte tokens
        out = data_prep.prepare([tmp_path / "c.txt"], tmp_path / f"ds{shards}", settings)
        assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"] == shards
        assert len(list(out.glob("train-*.tar"))) == shards
        manifest[shards] = (out / "manifest.json").stat().st_size
        table[shards] = (out / "train.shards.npy").stat().st_size
    assert abs(manifest[1000] - manifest[10]) <= 16, manifest
    assert (table[1000] - table[10]) % 990 == 0 and (table[1000] - table[10]) // 990 <= 128, table


# ---------------------------------------------------------------- prep: killed, resumed; many files; huge records


def test_prep_resumes_after_a_kill_without_redoing_finished_shards(tmp_path):
    rng = np.random.default_rng(1008)
    (tmp_path / "corpus.txt").write_text("".join(rng.choice(ALPHABET, 1_000_000)))
    args = ["char", "--input", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "ds"),
            "--shard-size-mb", "0.004", "--sample-tokens", "1000"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "ds.partial" / "progress.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.is_file() and log.read_text().count('"shard"') >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [record["shard"] for record in _records(log) if "shard" in record]
    assert 3 <= len(finished) < 400, "prep was not killed mid-run"
    before = {e["name"]: (tmp_path / "ds.partial" / e["name"]).stat() for e in finished}

    out = data_prep.prepare([tmp_path / "corpus.txt"], tmp_path / "ds", data_prep.PrepSettings(
        shard_size_mb=0.004, sample_tokens=1000))
    for name, stat in before.items():  # the very same files: not rewritten
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    fresh = data_prep.prepare([tmp_path / "corpus.txt"], tmp_path / "fresh", data_prep.PrepSettings(
        shard_size_mb=0.004, sample_tokens=1000))
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    assert all((out / n).read_bytes() == (fresh / n).read_bytes() for n in names)



def test_a_resumed_prep_leaves_out_what_the_killed_run_was_writing(tmp_path, monkeypatch):
    """A kill mid-write leaves the writer's temporary sibling (`.NAME.tmpPID`) in `<out>.partial`: the resumed prep
    removes it, so the dataset holds what a fresh prep writes (it kept a `.train-000008.idx.tmp<pid>`)."""
    import data_prep.prep as prep_module

    rng = np.random.default_rng(7)
    (tmp_path / "corpus.txt").write_text("".join(rng.choice(ALPHABET, 40_000)))
    settings = data_prep.PrepSettings(shard_size_mb=0.004, sample_tokens=1000)
    real, written = prep_module.write_shard, []

    def killed_at_the_third(job, work):
        if len(written) == 2:  # as a SIGKILL inside write_whole would leave it, under another process's pid
            (work / f".{job.name}.idx.tmp4242").write_bytes(b"torn")
            (work / "chunks" / ".chunk-000000.bin.tmp4242").write_bytes(b"torn")
            raise KeyboardInterrupt
        written.append(job.name)
        return real(job, work)

    monkeypatch.setattr(prep_module, "write_shard", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        data_prep.prepare([tmp_path / "corpus.txt"], tmp_path / "ds", settings)
    monkeypatch.undo()
    out = data_prep.prepare([tmp_path / "corpus.txt"], tmp_path / "ds", settings)
    fresh = data_prep.prepare([tmp_path / "corpus.txt"], tmp_path / "fresh", settings)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())

def _records(log):
    """The progress log's complete lines (a kill may leave a torn last one)."""
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def test_the_manifest_of_a_10k_file_corpus_stays_small(tmp_path):
    for count in (10, 10_000):
        corpus = tmp_path / f"c{count}"
        for d in range(-(-count // 1000)):
            (corpus / f"{d:02d}").mkdir(parents=True)
        for i in range(count):  # os-level writes: 10k files in a second or two
            fd = os.open(corpus / f"{i // 1000:02d}" / f"{i:05d}.txt", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, f"document {i}\n".encode())
            os.close(fd)
        out = data_prep.prepare([corpus], tmp_path / f"ds{count}", data_prep.PrepSettings(val_fraction=0.0))
        size = (out / "manifest.json").stat().st_size
        assert size < 2500, size
        listed = (out / "sources.jsonl").read_text().splitlines()
        assert len(listed) == count and json.loads(listed[-1])["path"].endswith(f"{count - 1:05d}.txt")


def _huge_record_text(rng, n_chars):
    """Text with everything a JSON string may escape: quotes, backslashes, controls, astral characters (encoded as
    surrogate pairs), long runs of spaces, newlines."""
    words = ["a", "ab", "  ", "\"q\"", "\\", "\t", "\n", "é", "日本", "🙂", "𝔘x", " ", "word", "\u2028", "\x01"]
    return "".join(rng.choice(words, n_chars // 3))


@pytest.mark.parametrize("ascii_escapes", [True, False])
def test_a_record_larger_than_a_chunk_is_read_as_the_same_text(tmp_path, ascii_escapes):
    """An over-long .jsonl record is parsed as a stream (other fields skipped), and its pieces join to exactly the
    text json.loads gives; each piece ends at a newline or before a space run."""
    rng = np.random.default_rng(1009)
    text = _huge_record_text(rng, 20_000)
    record = {"id": 7, "meta": {"a": [1, {"b": "}]\\\""}], "c": None}, "body": text, "tail": "x" * 3000}
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"body": "small"}) + "\n" + json.dumps(record, ensure_ascii=ascii_escapes) + "\n"
                    + json.dumps({"body": "last"}) + "\n")
    files = []
    pieces = [piece for chunk in iter_chunks([path], "body", 64, lambda *a: files.append(a)) for piece in chunk]
    starts = [i for i, (_, first) in enumerate(pieces) if first] + [len(pieces)]
    docs = ["".join(t for t, _ in pieces[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    assert docs == ["small", text, "last"]
    inner = [t for t, _ in pieces[starts[1]:starts[2]]]
    for a, b in zip(inner, inner[1:], strict=False):  # cut after a newline, or before a space run, or (only
        cut_anywhere = "\n" not in a and re.search("[^ ] ", a) is None  # where a has neither) anywhere
        assert a.endswith("\n") or (b[0] == " " and a[-1] != " ") or cut_anywhere, (a[-5:], b[:5])
    assert max(len(t) for t in inner) < 3 * 64  # bounded pieces
    assert files == [(str(path), path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())]


def test_a_huge_record_is_tokenised_like_the_same_text_in_a_txt_file(tmp_path):
    text = _huge_record_text(np.random.default_rng(1010), 60_000)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "big.txt").write_text(text, newline="")
    settings = data_prep.PrepSettings(val_fraction=0.0, chunk_chars=500)
    a = data_prep.prepare([tmp_path / "big.jsonl"], tmp_path / "a", settings)
    b = data_prep.prepare([tmp_path / "big.txt"], tmp_path / "b", settings)
    chars = sorted(set(text))
    expected = np.array([chars.index(c) for c in text], dtype="<u2")
    for out in (a, b):
        with tarfile.open(out / "train-000000.tar") as tar:
            got = np.concatenate([np.frombuffer(tar.extractfile(m).read(), "<u2") for m in tar])
        assert np.array_equal(got, expected)


def test_sentencepiece_encodes_the_pieces_of_a_long_line_as_the_whole_line(tmp_path):
    """Pieces are cut before a space that follows a non-space: a sentencepiece word boundary."""
    rng = np.random.default_rng(1011)
    words = ["the", "king", " ", "  ", "of", "thou", "art", ",", "épée", "日本", "42", "\t"]
    line = "".join(rng.choice(words, 40_000))  # one line, no newline: far longer than a piece
    (tmp_path / "train.txt").write_text(line)
    out = data_prep.prepare([tmp_path / "train.txt"], tmp_path / "sp", data_prep.PrepSettings(
        tokenizer="sentencepiece", vocab_size=400, val_fraction=0.0, chunk_chars=300))
    from megagpt.dataset import load_tokenizer

    tok = load_tokenizer(out)
    pieces = [t for chunk in iter_chunks([tmp_path / "train.txt"], "text", 300) for t, _ in chunk]
    assert len(pieces) > 100 and "".join(pieces) == line
    assert np.concatenate([tok.encode_array(p) for p in pieces]).tolist() == tok.sp.encode(line)


def test_reading_a_huge_record_takes_bounded_memory(tmp_path):
    text = "word " * 2_000_000  # 10 MB in one record
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": text}) + "\n")
    tracemalloc.start()
    total = sum(len(t) for chunk in iter_chunks([path], "text", 1 << 16) for t, _ in chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == len(text) and peak < 3_000_000, peak


def test_the_sentencepiece_sample_is_bounded_in_characters_and_otherwise_a_plain_reservoir(tmp_path):
    rng = np.random.default_rng(1012)
    lines = ["x" * int(n) for n in rng.integers(1, 9000, 400)]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    pieces = [line[i:i + MAX_LINE_CHARS] for line in lines for i in range(0, len(line), MAX_LINE_CHARS)]
    seed = int(rng.integers(1000))
    import random

    r, reservoir = random.Random(seed), []  # Algorithm R, written out here
    for seen, piece in enumerate(pieces, 1):
        if len(reservoir) < 50:
            reservoir.append(piece)
        elif (j := r.randrange(seen)) < 50:
            reservoir[j] = piece
    assert sample_lines([tmp_path / "c.txt"], "text", 1 << 20, 50, seed, sample_chars=10**9) == reservoir
    bounded = sample_lines([tmp_path / "c.txt"], "text", 1 << 20, 50, seed, sample_chars=30_000)
    assert sum(map(len, bounded)) <= 30_000 and len(bounded) >= 5


def test_prep_peak_disk_stays_near_the_output(tmp_path, monkeypatch):
    """Chunks hold uint16 ids and go as soon as their shards are written: observed at every shard write,
    chunks + shards stay within 1.2x the final output."""
    import data_prep.prep as prep_module

    (tmp_path / "c.txt").write_text("".join(np.random.default_rng(1013).choice(ALPHABET, 2_000_000)))
    work = tmp_path / "ds.partial"
    peak = [0]
    real_write = prep_module.write_shard

    def observed_write(job, out_dir):
        peak[0] = max(peak[0], sum(p.stat().st_size for p in work.rglob("*") if p.is_file()))
        return real_write(job, out_dir)

    monkeypatch.setattr(prep_module, "write_shard", observed_write)
    out = data_prep.prepare([tmp_path / "c.txt"], tmp_path / "ds", data_prep.PrepSettings(
        shard_size_mb=0.1, sample_tokens=10_000, chunk_chars=50_000))
    output = sum(p.stat().st_size for p in out.iterdir())
    assert len(list(out.glob("*.tar"))) >= 20 and peak[0] <= 1.2 * output, (peak[0], output)
