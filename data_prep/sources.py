"""Corpus reading: files, dirs, globs of .txt/.jsonl (optionally .gz) streamed as bounded text chunks."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

from megagpt.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")

# A chunk is a list of (text, starts_document) pieces; EOS goes before every document but the first.
Chunk = list[tuple[str, bool]]


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files, directories (recursively) and globs, each expanded in sorted order, duplicates dropped."""
    found: list[Path] = []
    for spec in inputs:
        spec = str(spec)
        path = Path(spec)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"--input {spec}: no such file, or no {'/'.join(SUFFIXES)} files in it")
        for m in matches:
            if not m.name.endswith(SUFFIXES):
                raise UserError(f"--input {m}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        found.extend(m.resolve() for m in matches)
    return list(dict.fromkeys(found))


class _HashingReader(io.RawIOBase):
    """Passes a binary file through while hashing it, so a source is hashed in the pass that reads it."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def _open_text(path: Path, digest=None) -> io.TextIOBase:
    raw = open(path, "rb")  # noqa: SIM115 - closed through the wrapper
    if digest is not None:
        raw = io.BufferedReader(_HashingReader(raw, digest), 1 << 20)
    stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
    # newline="": "\r\n" and lone "\r" reach the tokenizer unchanged.
    return io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="")


def _iter_pieces(path: Path, text_field: str, piece_chars: int, digest=None) -> Iterator[tuple[str, bool]]:
    """(text, starts_document) pieces of one file, each at most ~piece_chars characters."""
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    try:
        with _open_text(path, digest) as f:
            if jsonl:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    text = _jsonl_text(path, line_no, line, text_field)
                    for i in range(0, max(len(text), 1), piece_chars):
                        yield text[i:i + piece_chars], i == 0
                return
            carry, first = "", True  # a .txt file is one document, cut at newlines into pieces
            while block := f.read(piece_chars):
                text = carry + block
                cut = text.rfind("\n") + 1 or len(text)
                carry = text[cut:]
                if cut:
                    yield text[:cut], first
                    first = False
            if carry or first:
                yield carry, first
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def _jsonl_text(path: Path, line_no: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserError(f"{path}:{line_no}: no string field {text_field!r} (set --text-field)")
    return record[text_field]


def iter_chunks(paths: list[Path], text_field: str = "text", chunk_chars: int = 1 << 20,
                digests: dict[Path, object] | None = None) -> Iterator[Chunk]:
    """The corpus as chunks of about chunk_chars characters, cut the same way whatever reads them.

    Memory stays bounded by a few chunks whatever the corpus size. `digests`, when given, receives a
    sha256 object per path that has hashed the file's bytes once the iterator is exhausted.
    """
    chunk: Chunk = []
    size = 0
    for path in paths:
        digest = None
        if digests is not None:
            digest = digests[path] = hashlib.sha256()
        for text, starts_doc in _iter_pieces(path, text_field, chunk_chars, digest):
            chunk.append((text, starts_doc))
            size += len(text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def describe_sources(paths: list[Path], digests: dict[Path, object]) -> list[dict]:
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": digests[p].hexdigest()} for p in paths]
