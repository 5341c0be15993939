"""Corpus reading: files, dirs, globs of .txt/.jsonl (optionally .gz) streamed as bounded text pieces.

Memory is bounded by a few pieces whatever the corpus, a file or a record holds: a .txt file is read in blocks,
a .jsonl record longer than LONG_RECORD pieces is parsed as a stream (its text field decoded block by block),
and every text is cut into pieces of about `piece_chars` characters at a newline, else just before a space that
follows a non-space (a word boundary for sentencepiece, so pieces encode exactly as the whole text would), else
anywhere (a single word longer than a piece).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from megagpt.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
LONG_RECORD = 4  # a .jsonl line longer than this many pieces is parsed as a stream, not loaded whole
ENCODING = "utf-8-sig"  # UTF-8; a byte-order mark that opens a file (Windows tools write one) is dropped, not text

# A chunk is a list of (text, starts_document) pieces; EOS goes before every document but the first.
Chunk = list[tuple[str, bool]]


# ---------------------------------------------------------------- which files


def input_files(inputs: list[str | Path], exclude: tuple[str | Path, ...] = ()) -> list[str]:
    """Files, directories (recursively) and globs as absolute paths, each expanded in the order of sorting by
    path components, duplicates dropped; none under an `exclude` folder (a prep's own output and work dir, when
    they lie in an input folder). Strings, not Path objects: a million inputs stay ~150 MB."""
    excluded = tuple(os.path.join(os.path.realpath(folder), "") for folder in exclude)
    found: dict[str, None] = {}
    for spec in map(str, inputs):
        if os.path.isdir(spec):
            matches = list(_walk(os.path.realpath(spec)))  # corpus files only
        else:
            hits = [spec] if os.path.isfile(spec) else glob.glob(spec, recursive=True)
            matches = [os.path.realpath(p) for p in sorted(hits, key=lambda p: Path(p).parts) if os.path.isfile(p)]
            for m in matches:
                if not (m.endswith(SUFFIXES) or m.startswith(excluded)):
                    raise UserError(f"--input {m}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        if excluded:
            matches = [m for m in matches if not m.startswith(excluded)]
        if not matches:
            raise UserError(f"--input {spec}: no such file, or no {'/'.join(SUFFIXES)} files in it")
        found.update(dict.fromkeys(matches))
    return list(found)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """input_files as Path objects (for callers with few inputs)."""
    return [Path(p) for p in input_files(inputs)]


def _walk(directory: str) -> Iterator[str]:
    """Corpus files under directory, depth first, each directory's entries sorted by name (the order of sorting
    whole paths by components), one directory held at a time; symlinked directories are not entered."""
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        elif entry.name.endswith(SUFFIXES) and entry.is_file():
            yield entry.path


# ---------------------------------------------------------------- reading, hashing


class _HashingReader(io.RawIOBase):
    """Passes a binary file through while hashing and counting it: a source is hashed in the pass that reads it."""

    def __init__(self, raw):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        self.size += n
        return n


def _open_text(path: str, hashing: _HashingReader) -> io.TextIOBase:
    raw = io.BufferedReader(hashing, 1 << 20)
    stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    # newline="": "\r\n" and lone "\r" reach the tokenizer unchanged.
    return io.TextIOWrapper(stream, encoding=ENCODING, errors="strict", newline="")


def _boundary(text: str) -> int:
    """Where to cut text: after its last newline, else before its last space that follows a non-space."""
    cut = text.rfind("\n") + 1
    if cut:
        return cut
    space = text.rfind(" ")
    while space > 0 and text[space - 1] == " ":
        space -= 1
    return space if space > 0 else len(text)


def _pieces(blocks: Iterable[str], piece_chars: int) -> Iterator[str]:
    """One document given as blocks of at most piece_chars, re-cut at boundaries into pieces of about that size."""
    text = ""
    for block in blocks:
        text += block
        while len(text) >= piece_chars:
            cut = _boundary(text)
            yield text[:cut]
            text = text[cut:]
    if text:
        yield text


def _document(blocks: Iterable[str], piece_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, starts_document) for one document; an empty document is one empty piece (it still takes an EOS)."""
    first = True
    for piece in _pieces(blocks, piece_chars):
        yield piece, first
        first = False
    if first:
        yield "", True


def _iter_pieces(path: str, text_field: str, piece_chars: int,
                 hashing: _HashingReader) -> Iterator[tuple[str, bool]]:
    """(text, starts_document) pieces of one file, each about piece_chars characters."""
    try:
        with _open_text(path, hashing) as f:
            if path.endswith((".jsonl", ".jsonl.gz")):
                yield from _jsonl_pieces(f, path, text_field, piece_chars)
            else:  # a .txt file is one document
                yield from _document(iter(lambda: f.read(piece_chars), ""), piece_chars)
    except UnicodeDecodeError as e:
        raise utf8_error(path, e) from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def utf8_error(path: str | Path, error: UnicodeDecodeError) -> UserError:
    """A file that is not UTF-8, named with its first bad byte's offset and line. The text reader's error counts
    from the start of the block it was decoding, not of the file, so the file is read again to find them."""
    where = _first_bad_utf8(str(path))
    at = f" at byte {where[0]}{' of its text' * str(path).endswith('.gz')} (line {where[1]})" if where else ""
    return UserError(f"{path}: not valid UTF-8{at}: {error.reason}; re-encode it as UTF-8")


def _first_bad_utf8(path: str, block_size: int = 1 << 20) -> tuple[int, int] | None:
    """(byte offset, 1-based line) of the first byte that breaks UTF-8 (uncompressed, for .gz), or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        for block in itertools.chain(iter(lambda: f.read(block_size), b""), [b""]):  # b"": the end
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # e.object: the bytes held back from the last block, then this one
                return offset - (len(e.object) - len(block)) + e.start, lines + e.object[:e.start].count(b"\n") + 1
            offset, lines = offset + len(block), lines + block.count(b"\n")
    return None


def _jsonl_pieces(f, path: str, text_field: str, piece_chars: int) -> Iterator[tuple[str, bool]]:
    limit = LONG_RECORD * piece_chars
    line_no = 0
    while line := f.readline(limit):
        line_no += 1
        if len(line) == limit and not line.endswith("\n"):
            blocks = _RecordStream(f, line, f"{path}:{line_no}", piece_chars).text_blocks(text_field)
        elif not line.strip():
            continue
        else:
            text = _jsonl_text(path, line_no, line, text_field)
            blocks = (text[i:i + piece_chars] for i in range(0, len(text), piece_chars))
        yield from _document(blocks, piece_chars)


def _jsonl_text(path: str, line_no: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserError(f"{path}:{line_no}: no string field {text_field!r} (set --text-field)")
    return record[text_field]


# ---------------------------------------------------------------- an over-long .jsonl record as a stream

# possessive (*+): no backtracking state per character, so matching a long string takes constant memory
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+')
_HIGH_SURROGATE_TAIL = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")
_SCALAR = re.compile(r"[^,}\]\s]*")
_NESTING = re.compile(r'["{}\[\]]')


class _RecordStream:
    """The rest of one over-long .jsonl line, read in blocks: its object's text field decoded block by block,
    other fields skipped (scalars and nested values checked only for balance; the first text field counts)."""

    def __init__(self, f, head: str, where: str, block: int):
        self.f, self.buf, self.pos, self.where, self.block = f, head, 0, where, block
        self.at_end = head.endswith("\n")

    def _more(self) -> bool:
        """Append the next block of this line to the unread part; False at its end."""
        if self.at_end:
            return False
        more = self.f.readline(self.block)
        self.at_end = not more or more.endswith("\n")
        self.buf, self.pos = self.buf[self.pos:] + more, 0
        return bool(more)

    def _peek(self) -> str:
        while self.pos >= len(self.buf) or self.buf[self.pos] in " \t\r\n":
            if self.pos < len(self.buf):
                self.pos += 1
            elif not self._more():
                return ""
        return self.buf[self.pos]

    def _expect(self, chars: str) -> str:
        c = self._peek()
        if not c or c not in chars:
            self._fail(f"expected {' or '.join(map(repr, chars))}, found {c[:1]!r}")
        self.pos += 1
        return c

    def _fail(self, problem: str):
        raise UserError(f"{self.where}: not valid JSON ({problem})")

    def text_blocks(self, field: str) -> Iterator[str]:
        found = False
        self._expect("{")
        if self._peek() == "}":
            self.pos += 1
        else:
            while True:
                self._expect('"')
                key = "".join(self._string())
                self._expect(":")
                if key == field and not found and self._peek() == '"':
                    self.pos += 1
                    found = True
                    yield from self._string()
                else:
                    self._skip_value()
                if self._expect(",}") == "}":
                    break
        if self._peek():
            self._fail("text after the record")
        if not found:
            raise UserError(f"{self.where}: no string field {field!r} (set --text-field)")

    def _string(self) -> Iterator[str]:
        """A JSON string's content (after its opening quote), decoded in blocks; never splits an escape or a
        surrogate pair, so the blocks join to exactly what json.loads gives."""
        while True:
            end = _STRING_BODY.match(self.buf, self.pos).end()
            if end < len(self.buf) and self.buf[end] == '"':
                yield self._decode(self.buf[self.pos:end])
                self.pos = end + 1
                return
            if end < len(self.buf) and end + 6 <= len(self.buf):  # not a partial escape at the buffer's end
                self._fail(f"bad character {self.buf[end]!r} in a string")
            raw = self.buf[self.pos:end]
            if _HIGH_SURROGATE_TAIL.search(raw) and (len(raw) - 6 - len(raw[:-6].rstrip("\\"))) % 2 == 0:
                end -= 6  # keep a pair's first half with its second
            if end > self.pos:
                yield self._decode(self.buf[self.pos:end])
            self.pos = end
            if not self._more():
                self._fail("unterminated string")

    def _decode(self, raw: str) -> str:
        try:
            return json.loads(f'"{raw}"')
        except json.JSONDecodeError as e:
            self._fail(e.msg)

    def _skip_value(self) -> None:
        c = self._peek()
        if c == '"':
            self.pos += 1
            for _ in self._string():
                pass
        elif c in ("{", "["):
            self._skip_nested()
        else:
            end = _SCALAR.match(self.buf, self.pos).end()
            while end == len(self.buf) and self._more():
                end = _SCALAR.match(self.buf, self.pos).end()
            try:
                json.loads(self.buf[self.pos:end])
            except json.JSONDecodeError:
                self._fail(f"bad value {self.buf[self.pos:end][:20]!r}")
            self.pos = end

    def _skip_nested(self) -> None:
        depth = 0
        while True:
            m = _NESTING.search(self.buf, self.pos)
            if m is None:
                self.pos = len(self.buf)
                if not self._more():
                    self._fail("unterminated object or array")
                continue
            self.pos = m.end()
            if m.group() == '"':
                for _ in self._string():
                    pass
                continue
            depth += 1 if m.group() in "{[" else -1
            if depth == 0:
                return


# ---------------------------------------------------------------- chunks


def iter_chunks(paths: list[str | Path], text_field: str = "text", chunk_chars: int = 1 << 20,
                on_file: Callable[[str, int, str], None] | None = None) -> Iterator[Chunk]:
    """The corpus as chunks of about chunk_chars characters, cut the same way whatever reads them.

    Memory stays bounded by a few chunks whatever the corpus, file or record size. `on_file(path, bytes,
    sha256)` is called once a file has been read through (its bytes as stored, e.g. gzipped).
    """
    chunk: Chunk = []
    size = 0
    for path in map(str, paths):
        try:
            hashing = _HashingReader(open(path, "rb"))  # noqa: SIM115 - closed with the text wrapper
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e}") from None
        for text, starts_doc in _iter_pieces(path, text_field, chunk_chars, hashing):
            chunk.append((text, starts_doc))
            size += len(text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
        if on_file is not None:
            on_file(path, hashing.size, hashing.digest.hexdigest())
    if chunk:
        yield chunk
