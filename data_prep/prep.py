"""The prep pipeline: corpus -> tokenizer -> tokenized chunks -> shards -> manifest, parallel and atomic.

Determinism: the corpus is cut into chunks by `sources.iter_chunks` alone, chunks are tokenized independently
and laid end to end in order, and shard boundaries are fixed token offsets; so the shards are byte-identical
whatever --workers is. Work happens in `<out>.partial/` and is renamed to `<out>` only when complete; a
re-run with the same inputs and settings reuses the chunks and shards already finished there (sha256-checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.shards import ShardJob, write_shard
from data_prep.sources import describe_sources, expand_inputs, iter_chunks
from megagpt.dataset import (
    FORMAT_VERSION,
    TOKENIZER_FILES,
    Manifest,
    sha256_file,
    token_dtype_for,
    write_manifest,
)
from megagpt.errors import UserError
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
    # how, not what: not part of the output's identity
    workers: int = 1
    threads: int = 0  # sentencepiece trainer threads; 0: all cores

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("workers", "threads"):
            d.pop(key)
        if self.tokenizer == "char":
            for key in ("vocab_size", "model_type", "byte_fallback", "character_coverage", "sample_size"):
                d.pop(key)
        return d


def prepare(inputs: list[str | Path], out_dir: str | Path, settings: PrepSettings,
            force: bool = False, timings: dict | None = None) -> Path:
    """Prepare a dataset dir from corpus files; returns its path. `timings` receives seconds per phase."""
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    out_dir = Path(out_dir)
    _check(settings)
    if out_dir.exists() and not force:
        raise UserError(f"--out {out_dir}: already exists; pass --force to replace it")
    paths = expand_inputs(inputs)
    work = out_dir.with_name(out_dir.name + ".partial")
    stats = [{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    fingerprint = _hash_json({"settings": settings.identity(), "sources": stats, "format": FORMAT_VERSION})
    progress = _Progress(work, fingerprint)
    with _pool(settings.workers) as pool:
        char = settings.tokenizer == "char"
        tokenizer = None if char else _sentencepiece(paths, settings, work, progress)
        timings["tokenizer_s"], clock = time.perf_counter() - clock, time.perf_counter()
        chunk_dtype = "uint32" if char else token_dtype_for(tokenizer.vocab_size)
        offsets, chunk_files, digests, documents = _tokenize(paths, settings, tokenizer, chunk_dtype, work,
                                                             progress, pool)
        remap = None
        if char:
            tokenizer, remap = _char_tokenizer(work, progress, documents, paths)
        dtype = token_dtype_for(tokenizer.vocab_size)
        timings["tokenize_s"], clock = time.perf_counter() - clock, time.perf_counter()
        splits = _write_splits(offsets, chunk_files, settings, (chunk_dtype, dtype, remap), work, progress,
                               pool)
        timings["shards_s"] = time.perf_counter() - clock
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        kind="tokens",
        tokenizer={"kind": tokenizer.kind, "file": TOKENIZER_FILES[tokenizer.kind]},
        vocab_size=tokenizer.vocab_size,
        token_dtype=dtype,
        eos_id=tokenizer.eos_id,
        sample_tokens=settings.sample_tokens,
        splits=splits,
        sources=describe_sources(paths, digests),
        settings=settings.identity(),
    )
    write_manifest(work, manifest)
    shutil.rmtree(work / "chunks", ignore_errors=True)
    (work / _Progress.FILE).unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir


def _check(s: PrepSettings) -> None:
    if s.tokenizer not in ("char", "sentencepiece"):
        raise UserError(f"tokenizer {s.tokenizer!r}: expected char or sentencepiece")
    if not 0.0 <= s.val_fraction < 1.0:
        raise UserError(f"--val-fraction {s.val_fraction}: must be in [0, 1)")
    if s.workers < 1 or s.sample_tokens < 1 or s.chunk_chars < 1 or s.shard_size_mb <= 0:
        raise UserError("--workers, --sample-tokens and --shard-size-mb must be positive")


# ---------------------------------------------------------------- resumable progress in <out>.partial


class _Progress:
    """What <out>.partial already holds (chunk and shard sha256s) for a given fingerprint; reset otherwise."""

    FILE = "progress.json"

    def __init__(self, work: Path, fingerprint: str):
        self.work, self.path = work, work / self.FILE
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if data.get("fingerprint") != fingerprint:
            shutil.rmtree(work, ignore_errors=True)
            data = {"fingerprint": fingerprint}
        (work / "chunks").mkdir(parents=True, exist_ok=True)
        self.data = data
        self.data.setdefault("chunks", {})
        self.data.setdefault("shards", {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
    method = "fork" if "fork" in __import__("multiprocessing").get_all_start_methods() else "spawn"
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
    return 2 * settings.workers


# ---------------------------------------------------------------- tokenizers

EOS_CODEPOINT = 0x110000  # char level: chunks hold code points (EOS: one past Unicode's last) until remapped


def _sentencepiece(paths, settings: PrepSettings, work: Path, progress: _Progress) -> SentencePieceTokenizer:
    path = work / SENTENCEPIECE_FILE
    if not (path.is_file() and progress.data.get("tokenizer_sha256") == sha256_file(path)):
        from data_prep.spm import train_sentencepiece

        train_sentencepiece(paths, settings, path)
        progress.data["tokenizer_sha256"] = sha256_file(path)
        progress.save()
    return SentencePieceTokenizer(path)


def _char_tokenizer(work: Path, progress: _Progress, documents: int, paths) -> tuple[CharTokenizer, str]:
    """The sorted characters seen while tokenizing, EOS reserved only for several documents; and the
    code point -> id table the shard writers apply."""
    codes = np.asarray(progress.data.get("codepoints", []), dtype=np.int64)
    codes = codes[codes < EOS_CODEPOINT]
    if codes.size == 0:
        raise UserError(f"the inputs ({', '.join(map(str, paths[:3]))}) contain no text")
    tokenizer = CharTokenizer([chr(c) for c in codes], eos_id=len(codes) if documents > 1 else None)
    tokenizer.save(work / TOKENIZER_FILES["char"])
    table = np.zeros(EOS_CODEPOINT + 1, dtype=np.uint32)
    table[codes] = np.arange(len(codes), dtype=np.uint32)
    table[EOS_CODEPOINT] = tokenizer.eos_id or 0
    remap = work / "chunks" / "remap.npy"
    np.save(remap, table)
    return tokenizer, str(remap)


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


def _encode_chunk(index: int, chunk, tokenizer_file: str | None, dtype: str, path: str, known: list | None):
    """Tokenize a chunk into path, EOS before each document but the first: (tokens, sha256, chars, code
    points seen). tokenizer_file None: char level, which stores code points (one pass, no vocabulary pass)."""
    n_chars = sum(len(text) for text, _ in chunk)
    if known is not None and os.path.isfile(path) and sha256_file(path) == known[1]:
        return known[0], known[1], n_chars, None
    tokenizer = _tokenizer_in_worker(tokenizer_file) if tokenizer_file else None
    eos = tokenizer.eos_id if tokenizer else EOS_CODEPOINT
    parts = []
    for i, (text, starts_doc) in enumerate(chunk):
        if starts_doc and eos is not None and not (index == 0 and i == 0):
            parts.append(np.array([eos], dtype=dtype))
        parts.append(tokenizer.encode_array(text) if tokenizer else _codepoints(text))
    ids = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype=dtype)
    seen = None if tokenizer else np.flatnonzero(np.bincount(ids))  # 3x faster than np.unique
    tmp = path + ".tmp"
    ids.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(tmp)
    os.replace(tmp, path)
    return len(ids), hashlib.sha256(ids.tobytes()).hexdigest(), n_chars, seen


def _tokenize(paths, settings: PrepSettings, tokenizer, dtype: str, work: Path, progress: _Progress, pool):
    """(token offsets of the chunks, chunk files, source digests, number of documents)."""
    digests: dict = {}
    chunk_files: list[str] = []
    tokenizer_file = str(work / SENTENCEPIECE_FILE) if tokenizer else None
    documents = 0

    def jobs():
        nonlocal documents
        for index, chunk in enumerate(iter_chunks(paths, settings.text_field, settings.chunk_chars, digests)):
            documents += sum(starts for _, starts in chunk)
            path = str(work / "chunks" / f"{index:06d}.bin")
            chunk_files.append(path)
            yield index, chunk, tokenizer_file, dtype, path, progress.data["chunks"].get(str(index))

    def save():
        if pending_codes:
            known = np.asarray(progress.data.get("codepoints", []), np.int64)
            merged = np.concatenate([known, *pending_codes])
            progress.data["codepoints"] = np.unique(merged).tolist()
            pending_codes.clear()
        progress.save()

    total_bytes = sum(p.stat().st_size for p in paths)
    counts, pending_codes = [], []
    start = time.perf_counter()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=None) as bar:
        for tokens, digest, n_chars, seen in ordered_map(pool, _encode_chunk, jobs(), _in_flight(settings)):
            progress.data["chunks"][str(len(counts))] = [tokens, digest]
            counts.append(tokens)
            if seen is not None:
                pending_codes.append(seen)
            bar.update(n_chars)
            tokens_per_sec = sum(counts) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            if len(counts) % 16 == 0:
                save()
    save()
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
    return offsets, chunk_files, digests, documents


# ---------------------------------------------------------------- shards


def _write_shard_job(job: ShardJob, work: str, known: dict | None) -> dict:
    path = Path(work) / job.name
    if known is not None and path.is_file() and sha256_file(path) == known["sha256"]:
        return known
    return write_shard(job, Path(work))


def _write_splits(offsets, chunk_files, settings: PrepSettings, dtypes: tuple, work: Path,
                  progress: _Progress, pool):
    chunk_dtype, dtype, remap = dtypes
    total = offsets[-1]
    train_end = int(total * (1.0 - settings.val_fraction))
    itemsize = np.dtype(dtype).itemsize
    sample = settings.sample_tokens
    shard_tokens = max(sample, int(settings.shard_size_mb * (1 << 20) / itemsize) // sample * sample)
    jobs = []
    for split, lo, hi in (("train", 0, train_end), ("val", train_end, total)):
        for k, start in enumerate(range(lo, hi, shard_tokens)):
            jobs.append(ShardJob(f"{split}-{k:06d}.tar", start, min(start + shard_tokens, hi), sample, dtype,
                                 tuple(chunk_files), tuple(offsets), chunk_dtype, remap))
    splits = {"train": {"tokens": train_end, "samples": 0, "shards": []},
              "val": {"tokens": total - train_end, "samples": 0, "shards": []}}
    items = ((job, str(work), progress.data["shards"].get(job.name)) for job in jobs)
    for entry in ordered_map(pool, _write_shard_job, items, _in_flight(settings)):
        progress.data["shards"][entry["name"]] = entry
        progress.save()
        split = splits[entry["name"].split("-")[0]]
        split["shards"].append(entry)
        split["samples"] += entry["samples"]
    return splits
