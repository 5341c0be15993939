"""Shard writing: a token range of the tokenized chunk files as a reproducible webdataset tar."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

TOKENS_FIELD = "tokens"  # each sample is {"__key__": "000042", "tokens": raw little-endian token ids}


@dataclass(frozen=True)
class ShardJob:
    """Tokens [start, end) of the corpus stream (all chunk files laid end to end) as one shard."""

    name: str
    start: int
    end: int
    sample_tokens: int
    dtype: str
    chunk_files: tuple[str, ...]
    chunk_offsets: tuple[int, ...]  # cumulative token count before each chunk, plus the total at the end
    chunk_dtype: str
    remap: str | None = None  # a .npy table applied to the chunks' ids (char level: code point -> id)


def read_range(job: ShardJob, start: int, end: int) -> np.ndarray:
    """Tokens [start, end) of the stream, gathered from the chunk files that hold them."""
    offsets = job.chunk_offsets
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    parts = []
    i = first
    while start < end:
        lo, hi = offsets[i], offsets[i + 1]
        if hi > start:
            mm = np.memmap(job.chunk_files[i], dtype=job.chunk_dtype, mode="r")
            take = min(end, hi) - start
            parts.append(np.asarray(mm[start - lo:start - lo + take]))
            start += take
        i += 1
    return np.concatenate(parts) if parts else np.empty(0, dtype=job.chunk_dtype)


class _HashingWriter:
    """A write-only file that hashes what passes through: the shard's sha256 without reading it back."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_shard(job: ShardJob, out_dir: Path) -> dict:
    """Write the shard via a temp name (a killed write leaves no complete-looking file); its manifest entry.

    Byte-identical for identical tokens: fixed mtime, owner and mode, samples in order. No fsync: a shard
    damaged by a crash fails its manifest sha256 when the loader opens it.
    """
    path = Path(out_dir) / job.name
    tmp = path.with_name(path.name + ".tmp")
    samples = 0
    table = np.load(job.remap) if job.remap else None
    with open(tmp, "wb") as raw:
        f = _HashingWriter(raw)
        writer = wds.TarWriter(f, user="megagpt", group="megagpt", mode=0o444, encoder=False, mtime=0)
        for lo in range(job.start, job.end, job.sample_tokens):
            tokens = read_range(job, lo, min(lo + job.sample_tokens, job.end))
            if table is not None:
                tokens = table[tokens]
            payload = tokens.astype(np.dtype(job.dtype).newbyteorder("<"), copy=False).tobytes()
            writer.write({"__key__": f"{samples:06d}", TOKENS_FIELD: payload})
            samples += 1
        writer.close()
    os.replace(tmp, path)
    return {"name": job.name, "samples": samples, "tokens": job.end - job.start,
            "bytes": f.size, "sha256": f.digest.hexdigest()}
