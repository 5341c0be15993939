"""Shard writing: a token range of the tokenized chunk files as a reproducible webdataset tar plus its index."""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from megagpt.dataset import INDEX_RECORD, index_name
from megagpt.errors import UserError
from megagpt.files import temp_sibling, write_whole

TOKENS_FIELD = "tokens"  # each sample is {"__key__": "000042", "tokens": raw little-endian token ids}


def chunk_file(chunk_dir: str | Path, index: int, suffix: str = ".bin") -> str:
    """Chunk `index`'s token file (.bin) or, at char level, its table of code points (.cp)."""
    return os.path.join(chunk_dir, f"{index:06d}{suffix}")


@dataclass(frozen=True)
class ShardJob:
    """Tokens [start, end) of the corpus stream (the chunk files laid end to end) as one shard; the job names
    only the chunks that hold those tokens, so its size does not grow with the corpus."""

    name: str
    start: int
    end: int
    sample_tokens: int
    dtype: str
    chunk_dir: str
    first_chunk: int
    chunk_offsets: tuple[int, ...]  # stream offset of each of its chunks, plus the end of the last one
    chunk_dtypes: tuple[str, ...]
    vocab: str | None = None  # char level: a .npy of the vocabulary's code points (EOS last), see _tables


class _Tables:
    """Char level: chunk i holds ids into its own sorted code point table (chunks/NNNNNN.cp), so that it fits
    in uint16 whatever the corpus's alphabet; table -> vocabulary id is one searchsorted, cached per chunk."""

    def __init__(self, job: ShardJob):
        self.job, self.vocab, self.cache = job, np.load(job.vocab), {}

    def __call__(self, i: int) -> np.ndarray:
        if i not in self.cache:
            path = chunk_file(self.job.chunk_dir, self.job.first_chunk + i, ".cp")
            codes = np.fromfile(path, dtype="<u4")
            ids = np.searchsorted(self.vocab, codes)
            if not np.array_equal(self.vocab[np.minimum(ids, len(self.vocab) - 1)], codes):
                raise UserError(f"{path}: a character missing from the vocabulary; re-run prep with --force")
            self.cache[i] = ids.astype(self.job.dtype)
        return self.cache[i]


def read_range(job: ShardJob, start: int, end: int, tables: _Tables | None = None) -> np.ndarray:
    """Tokens [start, end) of the stream as vocabulary ids, gathered from the chunk files that hold them."""
    offsets = job.chunk_offsets
    i = bisect_right(offsets, start) - 1
    parts = []
    while start < end:
        lo, hi = offsets[i], offsets[i + 1]
        if hi > start:
            take = min(end, hi) - start
            path = chunk_file(job.chunk_dir, job.first_chunk + i)
            ids = np.asarray(np.memmap(path, dtype=job.chunk_dtypes[i], mode="r")[start - lo:start - lo + take])
            parts.append(tables(i)[ids] if tables is not None else ids)
            start += take
        i += 1
    return np.concatenate(parts) if parts else np.empty(0, dtype=job.dtype)


class _HashingWriter:
    """A write-only file that hashes what passes through: the shard's sha256 without reading it back."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_shard(job: ShardJob, out_dir: Path) -> dict:
    """Write the shard and its member index via temp names (a killed write leaves no complete-looking file);
    returns its manifest entry.

    Byte-identical for identical tokens: fixed mtime, owner and mode, samples in order. No fsync: a shard
    damaged by a crash fails its member sha256 when read, and `megagpt data verify`.
    """
    path = Path(out_dir) / job.name
    tmp = temp_sibling(path)
    tables = _Tables(job) if job.vocab else None
    dtype = np.dtype(job.dtype).newbyteorder("<")
    index, max_token = [], 0
    with open(tmp, "wb") as raw:
        f = _HashingWriter(raw)
        writer = wds.TarWriter(f, user="megagpt", group="megagpt", mode=0o444, encoder=False, mtime=0)
        for lo in range(job.start, job.end, job.sample_tokens):
            tokens = read_range(job, lo, min(lo + job.sample_tokens, job.end), tables)
            payload = tokens.astype(dtype, copy=False).tobytes()
            writer.write({"__key__": f"{len(index):06d}", TOKENS_FIELD: payload})
            data_offset = writer.tarstream.offset - -(-len(payload) // 512) * 512  # payloads are 512-byte padded
            index.append((data_offset, len(payload), hashlib.sha256(payload).digest()))
            max_token = max(max_token, int(tokens.max(initial=0)))
        writer.close()
    index_bytes = np.array(index, dtype=INDEX_RECORD).tobytes()
    index_path = path.with_name(index_name(job.name))
    write_whole(index_path, index_bytes, fsync=False)
    os.replace(tmp, path)
    return {"name": job.name, "samples": len(index), "tokens": job.end - job.start, "bytes": f.size,
            "sha256": f.digest.hexdigest(), "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
            "max_token": max_token}
