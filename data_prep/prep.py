"""The prep pipeline: corpus -> tokenizer -> tokenized chunks -> shards -> manifest, parallel, atomic, resumable.

Determinism: the corpus is cut into chunks by `sources.iter_chunks` alone, chunks are tokenized independently
and laid end to end in order, and shard boundaries are fixed token offsets; so the shards are byte-identical
whatever --workers is. Work happens in `<out>.partial/` and is renamed to `<out>` only when complete; a kill or
crash leaves it to resume, a UserError (bad inputs or settings: a re-run must change them) removes a fresh one.

Costs that do not grow with the corpus per step: progress is an append-only log (`progress.jsonl`, one line per
finished chunk or shard, replayed by a re-run, which reuses what is finished and verified); a shard job names
only the chunks it reads; chunks hold ids in the final width (char level: uint16 ids into a per-chunk table of
code points) and each is deleted once the shards holding its tokens are written, so the disk peaks at about
the output plus the shards in flight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.out_dir import replace_out_dir, work_dir_for
from data_prep.shards import ShardJob, chunk_file, write_shard
from data_prep.sources import input_files, iter_chunks
from data_prep.spm import MIN_VOCAB as SPM_MIN_VOCAB
from megagpt.dataset import (
    FORMAT_VERSION,
    SOURCES_FILE,
    TOKENIZER_FILES,
    Manifest,
    index_name,
    sha256_file,
    shard_name,
    token_dtype_for,
    tokenizer_info,
    write_manifest,
    write_shard_table,
)
from megagpt.errors import UserError
from megagpt.files import remove_torn_writes, temp_sibling, write_whole
from megagpt.tokenizer import SENTENCEPIECE_FILE, CharTokenizer, SentencePieceTokenizer


@dataclass
class PrepSettings:
    tokenizer: str = "char"  # char | sentencepiece
    val_fraction: float = 0.1
    seed: int = 1337
    text_field: str = "text"
    shard_size_mb: float = 256.0
    sample_tokens: int = 1 << 20  # tokens per tar member: big runs keep tar overhead far below 1%
    chunk_chars: int = 1 << 20  # unit of parallel tokenization; part of the output's identity
    # sentencepiece only
    vocab_size: int = 8192
    model_type: str = "bpe"
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    sample_size: int = 300_000  # lines (long lines cut at 4,000 chars) drawn by reservoir sampling
    sample_chars: int = 100_000_000  # and at most this many characters in all
    # how, not what: not part of the output's identity
    workers: int = 1
    threads: int = 0  # sentencepiece trainer threads; 0: all cores

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("workers", "threads"):
            d.pop(key)
        if self.tokenizer == "char":
            for key in ("vocab_size", "model_type", "byte_fallback", "character_coverage", "sample_size",
                        "sample_chars"):
                d.pop(key)
        return d


def prepare(inputs: list[str | Path], out_dir: str | Path, settings: PrepSettings,
            force: bool = False, timings: dict | None = None) -> Path:
    """Prepare a dataset dir from corpus files; returns its path. `timings` receives seconds per phase."""
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    out_dir = Path(out_dir)
    _check(settings)
    work = work_dir_for(out_dir, force)
    paths = input_files(inputs, exclude=(out_dir, work))  # never its own output: a re-run would read it
    progress = _Progress(work, _fingerprint(paths, settings))
    try:
        with _pool(settings.workers) as pool:
            char = settings.tokenizer == "char"
            tokenizer = None if char else _sentencepiece(paths, settings, work, progress)
            timings["tokenizer_s"], clock = time.perf_counter() - clock, time.perf_counter()
            tokenized = _tokenize(paths, settings, tokenizer, work, progress, pool)
            vocab = None
            if char:
                tokenizer, vocab = _char_tokenizer(work, progress, tokenized["documents"], paths)
            dtype = token_dtype_for(tokenizer.vocab_size)
            timings["tokenize_s"], clock = time.perf_counter() - clock, time.perf_counter()
            splits = _write_splits(_Layout(progress, settings, dtype), vocab, work, progress, pool,
                                   _in_flight(settings))
            timings["shards_s"] = time.perf_counter() - clock
    except UserError:
        progress.abandon()
        raise
    finally:
        progress.close()
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        kind="tokens",
        tokenizer=tokenizer_info(tokenizer.kind, work / TOKENIZER_FILES[tokenizer.kind]),
        vocab_size=tokenizer.vocab_size,
        token_dtype=dtype,
        eos_id=tokenizer.eos_id,
        sample_tokens=settings.sample_tokens,
        splits={split: write_shard_table(work, split, shards) for split, shards in splits.items()},
        sources=tokenized["sources"],
        settings=settings.identity(),
    )
    write_manifest(work, manifest)
    shutil.rmtree(work / "chunks", ignore_errors=True)
    (work / _Progress.FILE).unlink(missing_ok=True)
    replace_out_dir(work, out_dir)
    return out_dir


def _check(s: PrepSettings) -> None:
    if s.tokenizer not in ("char", "sentencepiece"):
        raise UserError(f"tokenizer {s.tokenizer!r}: expected char or sentencepiece")
    if not 0.0 <= s.val_fraction < 1.0:
        raise UserError(f"--val-fraction {s.val_fraction}: must be in [0, 1)")
    if not (0 < s.shard_size_mb < math.inf):  # also refuses nan
        raise UserError(f"--shard-size-mb {s.shard_size_mb}: must be a positive number of megabytes")
    positive = {"--workers": s.workers, "--sample-tokens": s.sample_tokens, "chunk_chars": s.chunk_chars}
    if s.tokenizer == "sentencepiece":
        positive.update({"--vocab-size": s.vocab_size, "--sample-size": s.sample_size,
                         "--sample-chars": s.sample_chars})
        if s.vocab_size < SPM_MIN_VOCAB:  # below it the trainer fails without saying why (vocab 1: "INTERNAL")
            raise UserError(f"--vocab-size {s.vocab_size}: sentencepiece needs at least {SPM_MIN_VOCAB} pieces "
                            f"(<unk>, </s>, the \\n and \\t pieces, one character)")
        if not 0.98 <= s.character_coverage <= 1.0:
            raise UserError(f"--character-coverage {s.character_coverage}: sentencepiece accepts 0.98 to 1")
        if not 0 <= s.threads <= 1024:
            raise UserError(f"--threads {s.threads}: must be 0 (all cores) to 1024")
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")


def _fingerprint(paths: list[str], settings: PrepSettings) -> str:
    """What defines the output: settings, format, and each input's path, size and mtime (streamed, no list)."""
    digest = hashlib.sha256(json.dumps({"settings": settings.identity(), "format": FORMAT_VERSION},
                                       sort_keys=True).encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- resumable progress: an append-only log


class _Progress:
    """`<out>.partial/progress.jsonl`: the fingerprint, then one JSON line per finished step (the tokenizer, a
    chunk, new code points, the end of tokenization, a shard), appended and flushed: O(1) per update. A re-run
    with the same fingerprint replays it (a torn last line from a kill is dropped); another one starts over."""

    FILE = "progress.jsonl"

    def __init__(self, work: Path, fingerprint: str):
        self.path = work / self.FILE
        self.tokenizer_sha256: str | None = None
        self.chunk_tokens = array("q")  # per chunk: token count, sha256 (32 bytes), 1 if uint32 ids
        self.chunk_digests, self.chunk_wide = bytearray(), bytearray()
        self.codepoints: set[int] = set()
        self.tokenized: dict | None = None
        self.shards: dict[str, dict] = {}
        self.work = work
        records = self._read()
        self.resumed = bool(records) and records[0].get("fingerprint") == fingerprint
        if not self.resumed:
            shutil.rmtree(work, ignore_errors=True)
            (work / "chunks").mkdir(parents=True)
            records = []
            self.path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        else:  # what the killed run was writing is written again; its temporary files must not reach the dataset
            for folder in (work, work / "chunks"):
                remove_torn_writes(folder)
        for record in records[1:]:
            self._apply(record)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records, good = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    records.pop()
                    break
                good += len(line)
        os.truncate(self.path, good)  # appends must not follow a torn line
        return records

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._apply(record)

    def _apply(self, record: dict) -> None:
        if "chunk" in record:
            if record["chunk"] == len(self.chunk_tokens):
                self.chunk_tokens.append(record["tokens"])
                self.chunk_digests += bytes.fromhex(record["sha256"])
                self.chunk_wide.append(record["dtype"] == "uint32")
        elif "codepoints" in record:
            self.codepoints.update(record["codepoints"])
        elif "shard" in record:
            self.shards[record["shard"]["name"]] = record["shard"]
        elif "tokenized" in record:
            self.tokenized = record["tokenized"]
        elif "tokenizer_sha256" in record:
            self.tokenizer_sha256 = record["tokenizer_sha256"]

    def chunk(self, i: int) -> tuple[int, str, str] | None:
        """(tokens, sha256, dtype) of a finished chunk, or None."""
        if i >= len(self.chunk_tokens):
            return None
        return (self.chunk_tokens[i], self.chunk_digests[32 * i:32 * i + 32].hex(),
                "uint32" if self.chunk_wide[i] else "uint16")

    def close(self) -> None:
        self._file.close()

    def abandon(self) -> None:
        """After a UserError: a partial this run started is removed (nothing in it could be resumed once the
        inputs or settings change); one resumed from a killed run stays for the next try."""
        self.close()
        if not self.resumed:
            shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------- worker pool with bounded, ordered results


class _InProcess:
    def submit(self, fn, *args):
        return _Done(fn(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _pool(workers: int):
    if workers == 1:
        return _InProcess()
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=get_context(method))


def ordered_map(pool, fn: Callable, items: Iterable, in_flight: int) -> Iterator:
    """fn over items in the pool, results in input order, at most in_flight items submitted at a time."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _in_flight(settings: PrepSettings) -> int:
    """Jobs submitted ahead: two per worker keep a pool busy; one in process (a result is used at once, so a
    shard's chunks are deleted before the next shard is written)."""
    return 2 * settings.workers if settings.workers > 1 else 1


# ---------------------------------------------------------------- tokenizers

EOS_CODEPOINT = 0x110000  # char level: chunk tables hold code points (EOS: one past Unicode's last)


def _sentencepiece(paths, settings: PrepSettings, work: Path, progress: _Progress) -> SentencePieceTokenizer:
    path = work / SENTENCEPIECE_FILE
    if not (path.is_file() and progress.tokenizer_sha256 == sha256_file(path)):
        from data_prep.spm import train_sentencepiece

        train_sentencepiece(paths, settings, path)
        progress.append({"tokenizer_sha256": sha256_file(path)})
    return SentencePieceTokenizer(path)


def _char_tokenizer(work: Path, progress: _Progress, documents: int, paths) -> tuple[CharTokenizer, str]:
    """The sorted characters seen while tokenizing, EOS reserved only for several documents; and the file of
    the vocabulary's code points (EOS last) through which the shard writers map the chunks' tables."""
    vocab = np.array(sorted(progress.codepoints), dtype=np.int64)
    chars = vocab[vocab < EOS_CODEPOINT]
    if chars.size == 0:
        raise UserError(f"the inputs ({', '.join(map(str, paths[:3]))}) contain no text")
    tokenizer = CharTokenizer([chr(c) for c in chars], eos_id=len(chars) if documents > 1 else None)
    tokenizer.save(work / TOKENIZER_FILES["char"])
    path = work / "chunks" / "vocab.npy"
    np.save(path, vocab)
    return tokenizer, str(path)


# ---------------------------------------------------------------- tokenization


_TOKENIZERS: dict[str, object] = {}  # per worker process: the tokenizer, loaded once


def _tokenizer_in_worker(tokenizer_file: str):
    path = Path(tokenizer_file)
    key = f"{path}:{path.stat().st_mtime_ns}:{path.stat().st_size}"  # a re-trained file is a new tokenizer
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = SentencePieceTokenizer(path)
    return _TOKENIZERS[key]


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _chunk_digest(path: str, char: bool) -> str | None:
    """sha256 of a chunk's files (ids, then the char table), or None when one is missing."""
    digest = hashlib.sha256()
    for name in (path, path[:-len(".bin")] + ".cp") if char else (path,):
        if not os.path.isfile(name):
            return None
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()


def _encode_chunk(index: int, chunk, tokenizer_file: str | None, path: str, known: tuple | None):
    """Tokenize a chunk into path, EOS before each document but the first: (tokens, sha256, dtype, code points
    seen). known = (tokens, sha256, dtype, reuse_unchecked): a finished chunk, reused when no longer needed or
    when its files still match. Char level (tokenizer_file None) stores ids into the chunk's own sorted table
    of code points (NNNNNN.cp), uint16 unless the chunk holds more than 65,536 distinct characters."""
    char = tokenizer_file is None
    if known is not None and (known[3] or _chunk_digest(path, char) == known[1]):
        return known[0], known[1], known[2], None
    tokenizer = None if char else _tokenizer_in_worker(tokenizer_file)
    eos = EOS_CODEPOINT if char else tokenizer.eos_id
    parts = []
    for i, (text, starts_doc) in enumerate(chunk):
        if starts_doc and eos is not None and not (index == 0 and i == 0):
            parts.append(np.array([eos], dtype=np.int64))
        parts.append(_codepoints(text) if char else tokenizer.encode_array(text))
    ids = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    seen = None
    if char:
        seen = np.flatnonzero(np.bincount(ids)) if ids.size else np.empty(0, dtype=np.int64)  # 3x np.unique
        table = np.zeros(int(seen[-1]) + 1 if seen.size else 1, dtype=np.int64)
        table[seen] = np.arange(seen.size)
        ids = table[ids]
        write_whole(path[:-len(".bin")] + ".cp", seen.astype("<u4").tobytes(), fsync=False)
    dtype = token_dtype_for(seen.size if char else tokenizer.vocab_size)
    write_whole(path, ids.astype(np.dtype(dtype).newbyteorder("<")).tobytes(), fsync=False)  # digests on record
    return len(ids), _chunk_digest(path, char), dtype, seen


def _tokenize(paths, settings: PrepSettings, tokenizer, work: Path, progress: _Progress, pool) -> dict:
    """Chunk files for every chunk a shard still needs; returns {"chunks", "documents", "sources"}.

    A re-run after tokenization finished skips reading the corpus when the chunks still needed are intact."""
    vocab_size = tokenizer.vocab_size if tokenizer else len(progress.codepoints)
    needed = _needed_chunks(progress, settings, work, token_dtype_for(vocab_size))
    if progress.tokenized is not None and all(
            _chunk_digest(chunk_file(work / "chunks", i), tokenizer is None) == progress.chunk(i)[1]
            for i in np.flatnonzero(needed)):
        return progress.tokenized
    chunk_dir = work / "chunks"
    tokenizer_file = str(work / SENTENCEPIECE_FILE) if tokenizer else None
    sources = _SourceList(work)
    documents = 0

    def jobs():
        nonlocal documents
        for index, chunk in enumerate(iter_chunks(paths, settings.text_field, settings.chunk_chars, sources.add)):
            documents += sum(starts for _, starts in chunk)
            bar.update(sum(len(text) for text, _ in chunk))
            known = progress.chunk(index)
            if known is not None:
                known = (*known, needed is not None and not needed[index])
            yield index, chunk, tokenizer_file, chunk_file(chunk_dir, index), known

    total_bytes = sum(os.path.getsize(p) for p in paths)
    tokens, start, index = 0, time.perf_counter(), -1
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=None) as bar:
        for index, (n, digest, dtype, seen) in enumerate(ordered_map(pool, _encode_chunk, jobs(),
                                                                     _in_flight(settings))):
            new = [] if seen is None else sorted(set(seen.tolist()) - progress.codepoints)
            if new:  # before the chunk's own line: a chunk on record never lacks its characters
                progress.append({"codepoints": new})
            if progress.chunk(index) is None:
                progress.append({"chunk": index, "tokens": n, "sha256": digest, "dtype": dtype})
            tokens += n
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}", refresh=False)
    progress.append({"tokenized": {"chunks": index + 1, "documents": documents, "sources": sources.finish()}})
    return progress.tokenized


class _SourceList:
    """sources.jsonl, written as the files are read (path, bytes, sha256): the manifest holds only a summary."""

    def __init__(self, work: Path):
        self.path = work / SOURCES_FILE
        self.tmp = open(temp_sibling(self.path), "w")  # noqa: SIM115 - closed by finish()
        self.files, self.bytes = 0, 0

    def add(self, path: str, size: int, digest: str) -> None:
        self.tmp.write(json.dumps({"path": path, "bytes": size, "sha256": digest}) + "\n")
        self.files, self.bytes = self.files + 1, self.bytes + size

    def finish(self) -> dict:
        self.tmp.close()
        os.replace(self.tmp.name, self.path)
        return {"files": self.files, "bytes": self.bytes, "sha256": sha256_file(self.path),
                "list": SOURCES_FILE}


def _needed_chunks(progress: _Progress, settings: PrepSettings, work: Path, dtype: str) -> np.ndarray | None:
    """After tokenization: a flag per chunk, whether a shard not yet written (and verified) reads it; None before.
    Finished shards that no longer match their sha256 are forgotten here, so they are rewritten."""
    if progress.tokenized is None:
        return None
    for name, entry in list(progress.shards.items()):
        index = work / index_name(name)
        if not ((work / name).is_file() and sha256_file(work / name) == entry["sha256"] and index.is_file()
                and sha256_file(index) == entry["index_sha256"]):
            del progress.shards[name]
    layout = _Layout(progress, settings, dtype)
    needed = np.zeros(len(progress.chunk_tokens), dtype=bool)
    for job in layout.jobs(str(work / "chunks"), None):
        if job.name not in progress.shards:
            needed[job.first_chunk:job.first_chunk + len(job.chunk_dtypes)] = True
    return needed


# ---------------------------------------------------------------- shards


class _Layout:
    """Where the shards lie in the token stream: splits cut at int(total * (1 - val_fraction)), shards of a
    fixed number of tokens (whole samples) from each split's start."""

    def __init__(self, progress: _Progress, settings: PrepSettings, dtype: str):
        self.progress, self.dtype, self.sample = progress, dtype, settings.sample_tokens
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(progress.chunk_tokens, dtype=np.int64))])
        self.total = int(self.offsets[-1])
        self.train_end = int(self.total * (1.0 - settings.val_fraction))
        per_shard = int(settings.shard_size_mb * (1 << 20) / np.dtype(dtype).itemsize)
        self.shard_tokens = max(self.sample, per_shard // self.sample * self.sample)

    def jobs(self, chunk_dir: str, vocab: str | None) -> Iterator[ShardJob]:
        for split, lo, hi in (("train", 0, self.train_end), ("val", self.train_end, self.total)):
            for k, start in enumerate(range(lo, hi, self.shard_tokens)):
                end = min(start + self.shard_tokens, hi)
                first = int(np.searchsorted(self.offsets, start, side="right")) - 1
                last = int(np.searchsorted(self.offsets, end, side="left"))
                wide = self.progress.chunk_wide
                yield ShardJob(shard_name(split, k), start, end, self.sample, self.dtype, chunk_dir, first,
                               tuple(self.offsets[first:last + 1].tolist()),
                               tuple("uint32" if wide[i] else "uint16" for i in range(first, last)) if vocab
                               else (self.dtype,) * (last - first), vocab)


def _write_shard_job(job: ShardJob, work: str, known: dict | None) -> dict:
    return known if known is not None else write_shard(job, Path(work))


def _write_splits(layout: _Layout, vocab: str | None, work: Path, progress: _Progress, pool,
                  in_flight: int) -> dict[str, list[dict]]:
    """Every shard not yet written (in parallel, results in order); a chunk is deleted once every shard that
    reads it is written. Returns each split's shard entries, in order."""
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    jobs = list(layout.jobs(str(work / "chunks"), vocab))
    items = ((job, str(work), progress.shards.get(job.name)) for job in jobs)
    retired = 0  # chunks [0, retired) are deleted
    for job, entry in zip(jobs, ordered_map(pool, _write_shard_job, items, in_flight),
                          strict=True):
        if entry is not progress.shards.get(job.name):
            progress.append({"shard": entry})
        splits[job.name.split("-")[0]].append(entry)
        done = int(np.searchsorted(layout.offsets, job.end, side="right")) - 1  # chunks before `done` end by now
        for i in range(retired, done):
            for suffix in (".bin", ".cp"):
                Path(chunk_file(work / "chunks", i, suffix)).unlink(missing_ok=True)
        retired = max(retired, done)
    return splits
