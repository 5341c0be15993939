"""The dataset directory's format: file names, version, the manifest schema, hashing, and the opened `Dataset`.

A dataset dir is what `data_prep` writes and what training reads:
  manifest.json         this module's `Manifest` (format version, dataset kind, tokenizer, vocabulary, token
                        dtype, per split its totals, shard count and the sha256 of its shard table, the sources
                        and prep settings): the same few hundred bytes for 10 shards and for 10,000
  train.shards.npy ...  a split's shard table (SHARD_RECORD per shard: samples, tokens, bytes, largest token id,
                        sha256, index sha256), read in one go; shard k is named by its position (shard_name)
  tokenizer.json|.model the char vocabulary or the sentencepiece model (megagpt/tokenizer.py)
  train-000000.tar ...  webdataset shards; each member holds a packed run of little-endian token ids
  train-000000.idx ...  each shard's member index (INDEX_RECORD per member: payload offset, length, sha256),
                        hashed in the shard table: a loader opens a shard from it without reading the shard
  sources.jsonl         the input files prep read (path, bytes, sha256), one per line; the manifest holds
                        only their count, total bytes and this file's sha256
Dataset kinds are a field of the manifest, not new formats: `tokens` (packed runs, pre-training) today;
`chat` and `preferences` add per-sample fields to the same shards.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megagpt.errors import UserError
from megagpt.files import write_whole
from megagpt.tokenizer import CHAR_FILE, SENTENCEPIECE_FILE, Tokenizer, tokenizer_from_file, with_special_tokens

FORMAT_VERSION = 4  # 4: the tokenizer file's sha256 (3: still read, its tokenizer unchecked; 3 put per-shard
#                      facts in a table per split; 2: still read, shards listed in the manifest; 2 added shard
#                      indexes, max_token per shard, sources summarised; 1: re-run prep)
READ_VERSIONS = (2, 3, 4)
MANIFEST = "manifest.json"
TABLE_SUFFIX = ".shards.npy"
# One record per shard of a split, in order; -1 (bytes, max_token) and 32 zero bytes (index_sha256): not recorded.
SHARD_RECORD = np.dtype([("samples", "<i8"), ("tokens", "<i8"), ("bytes", "<i8"), ("max_token", "<i8"),
                         ("sha256", "V32"), ("index_sha256", "V32")])
SOURCES_FILE = "sources.jsonl"
INDEX_SUFFIX = ".idx"
# One record per tar member, in order: where its payload starts in the file, its length, the payload's sha256.
INDEX_RECORD = np.dtype([("offset", "<u8"), ("nbytes", "<u8"), ("sha256", "V32")])
TOKEN_DTYPES = ("uint16", "uint32")
TOKENIZER_FILES = {"char": CHAR_FILE, "sentencepiece": SENTENCEPIECE_FILE}


class DataError(UserError):  # UserError is a ValueError: the CLI prints it as one line
    """A dataset dir, manifest or shard that cannot be used; the message names the file."""


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in blocks (shards and checkpoints are larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ---------------------------------------------------------------- the manifest schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardInfo(_Strict):
    name: str = Field(description="file name in the dataset dir, or a URL (pipe:..., http://...) to stream")
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int | None = Field(None, ge=0)
    sha256: str
    index_sha256: str | None = Field(None, description=f"sha256 of the shard's member index ({INDEX_SUFFIX})")
    max_token: int | None = Field(None, ge=0, description="the largest token id in the shard")


class SplitInfo(_Strict):
    tokens: int = Field(ge=0)
    samples: int = Field(ge=0)
    shards: int | list[ShardInfo] = Field(description=f"format 3: how many (each a record of SPLIT{TABLE_SUFFIX}); "
                                          "format 2: the list itself")
    table_sha256: str | None = Field(None, description=f"format 3: sha256 of SPLIT{TABLE_SUFFIX}")
    shard_url: str | None = Field(None, description="format 3, shards stored elsewhere: a URL or path in which "
                                  "{name} stands for each shard's file name, e.g. 'pipe:aws s3 cp s3://b/d/{name} -'")


class TokenizerInfo(_Strict):
    kind: Literal["char", "sentencepiece", "huggingface"]
    file: str
    sha256: str | None = Field(None, description="the file's sha256 (format_version 4; None before)")


def tokenizer_info(kind: str, path: Path) -> dict[str, str]:
    """The manifest's record of a tokenizer file that prep wrote beside it."""
    return {"kind": kind, "file": path.name, "sha256": sha256_file(path)}


class Manifest(_Strict):
    format_version: Literal[2, 3, 4]
    kind: Literal["tokens", "chat", "preferences"] = Field(
        "tokens", description="tokens: packed runs of token ids (pre-training); chat: one conversation per sample, "
        "token ids plus a loss mask (data_prep/chat.py); preferences: one comparison per sample, a chosen and a "
        "rejected completion, each token ids plus a loss mask (data_prep/preferences.py)")
    tokenizer: TokenizerInfo
    vocab_size: int = Field(ge=1)
    token_dtype: Literal["uint16", "uint32"]
    eos_id: int | None = None
    sample_tokens: int | None = Field(None, ge=1, description="tokens per tar member (a packed run)")
    special_tokens: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, SplitInfo]
    sources: Any = None  # what prep read: {"files", "bytes", "sha256" of SOURCES_FILE, "list": SOURCES_FILE}
    settings: dict[str, Any] = Field(default_factory=dict)  # the prep settings that define the output

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"{MANIFEST}: no split {name!r} (has {', '.join(self.splits)})")
        return self.splits[name]


def write_manifest(dataset_dir: str | Path, manifest: Manifest) -> Path:
    """manifest.json, written via a temp name: a reader never sees half of it. Written last: each split's shard
    table (write_shard_table) comes first, as the manifest holds its sha256."""
    path = Path(dataset_dir) / MANIFEST
    write_whole(path, (json.dumps(manifest.model_dump(mode="json", exclude_none=False), indent=1) + "\n").encode())
    return path


def parse_manifest(raw: bytes, where: Path) -> Manifest:
    """The manifest from its bytes; a DataError naming the file and the key otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not a readable JSON manifest ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: not a JSON object")
    if data.get("format_version") not in READ_VERSIONS:
        raise DataError(f"{where}: format_version {data.get('format_version')!r}, this megagpt reads "
                        f"{', '.join(map(str, READ_VERSIONS))}; re-run `megagpt prep` to rewrite it")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{where}: {key}: {first['msg']}; re-run `megagpt prep` to rewrite it") from None
    if manifest.format_version >= 4 and manifest.tokenizer.sha256 is None:
        raise DataError(f"{where}: tokenizer.sha256 is missing (format_version 4 records it); re-run `megagpt prep` "
                        f"to rewrite it")
    for name in ("train", "val"):
        if name not in manifest.splits:
            raise DataError(f"{where}: splits.{name} is missing; re-run `megagpt prep` to rewrite it")
    for name, split in manifest.splits.items():
        listed = isinstance(split.shards, list)
        if listed != (manifest.format_version == 2) or (not listed and split.table_sha256 is None):
            want = "a list of shards" if manifest.format_version == 2 else "a shard count and table_sha256"
            raise DataError(f"{where}: splits.{name}: format_version {manifest.format_version} needs {want}; "
                            f"re-run `megagpt prep` to rewrite it")
    return manifest


def load_manifest(dataset_dir: str | Path) -> Manifest:
    path = Path(dataset_dir) / MANIFEST
    return parse_manifest(_read(path), path)


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: no manifest here; prepare the dataset with `megagpt prep ...`")
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None


# ---------------------------------------------------------------- shard tables: a split's per-shard facts


def shard_name(split: str, k: int) -> str:
    """Shard k of a split, by position: train-000000.tar, train-000001.tar, ..."""
    return f"{split}-{k:06d}.tar"


def table_name(split: str) -> str:
    return f"{split}{TABLE_SUFFIX}"


def _records(shards: list[dict]) -> np.ndarray:
    """Manifest entries of shards ({"samples", "tokens", "bytes", "sha256", ...}) as SHARD_RECORDs."""
    records = np.zeros(len(shards), dtype=SHARD_RECORD)
    for k, s in enumerate(shards):
        for key in ("bytes", "max_token"):
            records[key][k] = -1 if s.get(key) is None else s[key]
        records["samples"][k], records["tokens"][k] = s["samples"], s["tokens"]
        records["sha256"][k] = np.void(bytes.fromhex(s["sha256"]))
        if s.get("index_sha256") is not None:
            records["index_sha256"][k] = np.void(bytes.fromhex(s["index_sha256"]))
    return records


def write_shard_table(dataset_dir: str | Path, split: str, shards: list[dict]) -> dict:
    """A split's table (SPLIT.shards.npy, via a temp name) from its shards' entries in order, shard k named
    shard_name(split, k); returns the split's manifest entry (totals, shard count, the table's sha256)."""
    for k, shard in enumerate(shards):
        if shard["name"] != shard_name(split, k):
            raise ValueError(f"shard {k} of split {split} is named {shard['name']!r}, not {shard_name(split, k)!r}")
    records = _records(shards)
    buffer = io.BytesIO()
    np.save(buffer, records, allow_pickle=False)
    write_whole(Path(dataset_dir) / table_name(split), buffer.getvalue())
    return {"tokens": int(records["tokens"].sum()), "samples": int(records["samples"].sum()),
            "shards": len(records), "table_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}


class ShardTable:
    """A split's shards as parallel arrays (`records`, SHARD_RECORD each): O(1) Python objects whatever their
    number. Shard k is named shard_name(split, k), put into the split's shard_url when it has one; `table[k]`
    is its ShardInfo (built on demand, for the few places that look at one shard)."""

    def __init__(self, split: str, records: np.ndarray, shard_url: str | None = None,
                 names: list[str] | None = None):
        self.split, self.records, self.shard_url, self._names = split, records, shard_url, names  # names: format 2
        self.tokens = records["tokens"]
        self.remote = any(map(is_remote, names)) if names is not None else is_remote(shard_url or "")

    def __len__(self) -> int:
        return len(self.records)

    def name(self, k: int) -> str:
        if self._names is not None:
            return self._names[k]
        name = shard_name(self.split, k)
        return self.shard_url.replace("{name}", name) if self.shard_url else name

    def __getitem__(self, k: int) -> ShardInfo:
        r = self.records[k]
        index_sha256 = r["index_sha256"].tobytes()
        return ShardInfo(name=self.name(k), samples=int(r["samples"]), tokens=int(r["tokens"]),
                         bytes=None if r["bytes"] < 0 else int(r["bytes"]), sha256=r["sha256"].tobytes().hex(),
                         index_sha256=index_sha256.hex() if any(index_sha256) else None,
                         max_token=None if r["max_token"] < 0 else int(r["max_token"]))

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def read_shard_table(directory: Path, split: str, info: SplitInfo) -> ShardTable:
    """A split's shard table, read in one go and checked against the manifest (its sha256, count and totals);
    a format-2 manifest's list is turned into the same table."""
    if isinstance(info.shards, list):
        try:
            records = _records([s.model_dump() for s in info.shards])
        except ValueError as e:  # a sha256 that is not 64 hex digits
            where = Path(directory) / MANIFEST
            raise DataError(f"{where}: splits.{split}.shards: {e}; re-run `megagpt prep`") from None
        return ShardTable(split, records, names=[s.name for s in info.shards])
    path = Path(directory) / table_name(split)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard table of split {split} ({e.strerror}); re-run "
                        f"`megagpt prep`") from None
    if hashlib.sha256(raw).hexdigest() != info.table_sha256:
        raise DataError(f"{path}: does not match splits.{split}.table_sha256 in {MANIFEST}; the shard table is "
                        f"corrupt or was replaced: re-run `megagpt prep`")
    records = _npy_records(raw)
    if records is None or len(records) != info.shards or (
            int(records["tokens"].sum()), int(records["samples"].sum())) != (info.tokens, info.samples):
        raise DataError(f"{path}: not a table of the {info.shards} shards of splits.{split} in {MANIFEST} "
                        f"(records, count or totals differ); re-run `megagpt prep`")
    return ShardTable(split, records, info.shard_url)


def _npy_records(raw: bytes) -> np.ndarray | None:
    """The SHARD_RECORDs of a .npy file's bytes, not copied (np.load copies); None if it holds something else."""
    stream = io.BytesIO(raw)
    try:
        major, _ = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except ValueError:
        return None
    if dtype != SHARD_RECORD or len(shape) != 1 or len(raw) != stream.tell() + shape[0] * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype=SHARD_RECORD, count=shape[0], offset=stream.tell())


# ---------------------------------------------------------------- shard files: identity, index, full check


def is_remote(name: str) -> bool:
    """A shard name that is a URL (`pipe:...`, `http://...`): streamed, not opened as a local file."""
    return name.startswith("pipe:") or "://" in name


def index_name(shard_name: str) -> str:
    """The member index written next to a shard: train-000000.tar -> train-000000.idx."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


def check_shard_file(path: str | Path, shard: ShardInfo) -> None:
    """The cheap identity check (one stat), when a process first reads the shard: it exists, with the size
    recorded at prep."""
    try:
        size = os.stat(path).st_size
    except OSError:
        raise DataError(f"{path}: shard listed in its shard table is missing") from None
    if shard.bytes is not None and size != shard.bytes:
        raise DataError(f"{path}: truncated or corrupt shard ({size} bytes, its shard table says {shard.bytes})")


def read_index(directory: Path, shard: ShardInfo, token_dtype: str) -> np.ndarray:
    """A shard's member index (INDEX_RECORD per member), checked against the index_sha256 its table records and
    against its token count in the manifest's token_dtype."""
    path = Path(directory) / index_name(shard.name)
    if shard.index_sha256 is None:
        raise DataError(f"{Path(directory) / shard.name}: its shard table records no index for it; re-run "
                        f"`megagpt prep`")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard's index ({e.strerror}); re-run `megagpt prep`") from None
    if len(raw) != shard.samples * INDEX_RECORD.itemsize or hashlib.sha256(raw).hexdigest() != shard.index_sha256:
        raise DataError(f"{path}: does not match the index_sha256 in its shard table; the index is corrupt or "
                        f"was replaced: re-run `megagpt prep`")
    index = np.frombuffer(raw, dtype=INDEX_RECORD)
    nbytes, itemsize = int(index["nbytes"].sum()), np.dtype(token_dtype).itemsize
    if nbytes != shard.tokens * itemsize:
        raise DataError(f"{Path(directory) / shard.name}: its members hold {nbytes} bytes, not the {shard.tokens} "
                        f"tokens of {itemsize} bytes ({token_dtype}) that its shard table and {MANIFEST} say; the "
                        f"manifest was edited or belongs to other shards: re-run `megagpt prep`")
    return index


def verify_shard(directory: Path, shard: ShardInfo, token_dtype: str) -> None:
    """Every byte of a local shard: size, the file's sha256, and its index (hash, and the tar's own headers)."""
    path = Path(directory) / shard.name
    check_shard_file(path, shard)
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise DataError(f"{path}: sha256 {digest[:12]}... does not match its shard table's {shard.sha256[:12]}...; "
                        f"the shard is corrupt or was replaced: re-run prep")
    if shard.index_sha256 is None:  # kinds whose shards carry no index (chat) are checked by their hash alone
        return
    index = read_index(directory, shard, token_dtype)
    try:
        with tarfile.open(path, "r:") as tar:
            members = [(info.offset_data, info.size) for info in tar]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar ({e})") from None
    if members != list(zip(index["offset"].tolist(), index["nbytes"].tolist(), strict=True)):
        raise DataError(f"{path}: its members do not match {index_name(shard.name)}; re-run `megagpt prep`")


def human_bytes(n: int) -> str:
    """A size in the largest decimal unit it reaches (as `ls -h --si` and disk vendors count): 2.2 MB, 812 bytes."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def verify_main(argv: list[str]) -> int:
    """`megagpt data verify DIR`: check each split's shard table, then read every local shard in full against it."""
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="megagpt data verify", description=verify_main.__doc__)
    p.add_argument("dataset_dir")
    dataset = Dataset(p.parse_args(argv).dataset_dir)
    _ = dataset.tokenizer  # loads, and matches the manifest
    start, shards, bad_tables = time.perf_counter(), [], 0
    for split in dataset.manifest.splits:
        try:
            table = dataset.shards(split)
        except DataError as e:  # its shards cannot be checked without it
            bad_tables += 1
            print(f"megagpt data verify: {e}", file=sys.stderr)
            continue
        shards += list(table)
    local = [s for s in shards if not is_remote(s.name)]
    bad = 0
    for shard in tqdm(local, desc="verify", unit="shard", disable=None):
        try:
            verify_shard(dataset.dir, shard, dataset.manifest.token_dtype)
        except DataError as e:
            bad += 1
            print(f"megagpt data verify: {e}", file=sys.stderr)
    if bad or bad_tables:
        tables = f"{bad_tables} of {len(dataset.manifest.splits)} shard tables and " if bad_tables else ""
        raise DataError(f"{dataset.dir}: {tables}{bad} of {len(local)} shards failed (listed above)")
    remote = f"; {len(shards) - len(local)} remote shards not checked" if len(local) < len(shards) else ""
    size = human_bytes(sum(s.bytes or 0 for s in local))
    print(f"{dataset.dir}: {len(local)} shards ({size}) match the manifest "
          f"({time.perf_counter() - start:.1f} s){remote}")
    return 0


def manifest_tokenizer(directory: str | Path, manifest: Manifest) -> Tokenizer:
    """The tokenizer a manifest names, with its special tokens, checked against the manifest's vocab_size, eos_id
    and (format_version 4) the file's sha256: a tokenizer file from another dataset is refused here, not found out
    later as garbled text."""
    info = manifest.tokenizer
    path = Path(directory) / info.file
    tokenizer = with_special_tokens(tokenizer_from_file(info.kind, path), manifest.special_tokens)
    if (tokenizer.vocab_size, tokenizer.eos_id) != (manifest.vocab_size, manifest.eos_id):
        raise DataError(f"{path}: {tokenizer.vocab_size} ids (eos_id {tokenizer.eos_id}), but {MANIFEST} says "
                        f"vocab_size {manifest.vocab_size} (eos_id {manifest.eos_id}); the tokenizer or the manifest "
                        f"was replaced or edited: re-run `megagpt prep`")
    if info.sha256 is not None and sha256_file(path) != info.sha256:
        raise DataError(f"{path}: does not match the tokenizer sha256 in {MANIFEST}; the tokenizer was replaced or "
                        f"edited (another dataset's tokenizer of the same size reads these tokens as other text): "
                        f"re-run `megagpt prep`")
    return tokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a dataset dir, or of the tokenizer/ folder a run or export dir carries."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return manifest_tokenizer(directory, load_manifest(directory))
    for kind, name in TOKENIZER_FILES.items():
        if (directory / name).is_file():
            return tokenizer_from_file(kind, directory / name)
    raise DataError(f"{directory}: no {MANIFEST}, {CHAR_FILE} or {SENTENCEPIECE_FILE}; prepare a dataset with "
                    f"`megagpt prep ...`")


# ---------------------------------------------------------------- an opened dataset


class Dataset:
    """A dataset dir opened once per run: its manifest (read once), that file's hash, the tokenizer, and each
    split's shard table (read once, on first use).

    The loader, the evaluation and the checkpoint metadata all take this object instead of re-reading the dir.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._raw = _read(self.dir / MANIFEST)
        self.manifest = parse_manifest(self._raw, self.dir / MANIFEST)
        self.manifest_sha256 = hashlib.sha256(self._raw).hexdigest()  # covers the shard tables: it holds theirs
        self._tables: dict[str, ShardTable] = {}

    def shards(self, split: str) -> ShardTable:
        """A split's shards, read (and checked against the manifest) once, when first asked for."""
        if split not in self._tables:
            self._tables[split] = read_shard_table(self.dir, split, self.manifest.split(split))
        return self._tables[split]

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return manifest_tokenizer(self.dir, self.manifest)

    def copy_tokenizer_to(self, dest: Path) -> None:
        """The manifest (as read) and the tokenizer file into dest: a run or export then needs no dataset. The
        tokenizer is loaded and checked first, so a broken one stops a run before it trains, not at its first sample."""
        _ = self.tokenizer
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).write_bytes(self._raw)
        shutil.copy2(self.dir / self.manifest.tokenizer.file, dest / self.manifest.tokenizer.file)

    def __repr__(self) -> str:
        return f"Dataset({str(self.dir)!r}, kind={self.kind}, vocab_size={self.vocab_size})"


def as_dataset(dataset: Dataset | str | Path) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else Dataset(dataset)
