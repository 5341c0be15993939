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


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def read_range(job: ShardJob, start: int, end: int) -> np.ndarray:
    """Tokens [start, end) of the stream, gathered from the chunk files that hold them."""
    offsets = job.chunk_offsets
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    parts = []
    i = first
    while start < end:
        lo, hi = offsets[i], offsets[i + 1]
        if hi > start:
            mm = np.memmap(job.chunk_files[i], dtype=job.dtype, mode="r") if hi > lo else None
            take = min(end, hi) - start
            parts.append(np.asarray(mm[start - lo:start - lo + take]))
            start += take
        i += 1
    return np.concatenate(parts) if parts else np.empty(0, dtype=job.dtype)


def write_shard(job: ShardJob, out_dir: Path) -> dict:
    """Write the shard via a temp name (a killed write leaves no complete-looking file); its manifest entry.

    Byte-identical for identical tokens: fixed mtime, owner and mode, samples in order.
    """
    path = Path(out_dir) / job.name
    tmp = path.with_name(path.name + ".tmp")
    samples = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, user="megagpt", group="megagpt", mode=0o444, encoder=False, mtime=0)
        for lo in range(job.start, job.end, job.sample_tokens):
            tokens = read_range(job, lo, min(lo + job.sample_tokens, job.end))
            payload = tokens.astype(np.dtype(job.dtype).newbyteorder("<"), copy=False).tobytes()
            writer.write({"__key__": f"{samples:06d}", TOKENS_FIELD: payload})
            samples += 1
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": job.name, "samples": samples, "tokens": job.end - job.start,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}
