"""The dataset directory's format: file names, version, the manifest schema, hashing, and the opened `Dataset`.

A dataset dir is what `data_prep` writes and what training reads:
  manifest.json         this module's `Manifest` (format version, dataset kind, tokenizer, vocabulary, token
                        dtype, per split its shards with sizes and sha256, the sources and prep settings)
  tokenizer.json|.model the char vocabulary or the sentencepiece model (megagpt/tokenizer.py)
  train-000000.tar ...  webdataset shards; each member holds a packed run of little-endian token ids
  train-000000.idx ...  each shard's member index (INDEX_RECORD per member: payload offset, length, sha256),
                        hashed in the manifest: a loader opens a shard from it without reading the shard
  sources.jsonl         the input files prep read (path, bytes, sha256), one per line; the manifest holds
                        only their count, total bytes and this file's sha256
Dataset kinds are a field of the manifest, not new formats: `tokens` (packed runs, pre-training) today;
`chat` and `preferences` add per-sample fields to the same shards.
"""

from __future__ import annotations

import argparse
import hashlib
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
from megagpt.tokenizer import CHAR_FILE, SENTENCEPIECE_FILE, Tokenizer, tokenizer_from_file, with_special_tokens

FORMAT_VERSION = 2  # 2: shard indexes (.idx), max_token per shard, sources summarised (1: re-run prep)
MANIFEST = "manifest.json"
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
    shards: list[ShardInfo]


class TokenizerInfo(_Strict):
    kind: Literal["char", "sentencepiece", "huggingface"]
    file: str


class Manifest(_Strict):
    format_version: Literal[2]
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
    """manifest.json, written via a temp name: a reader never sees half of it."""
    path = Path(dataset_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json", exclude_none=False), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def parse_manifest(raw: bytes, where: Path) -> Manifest:
    """The manifest from its bytes; a DataError naming the file and the key otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not a readable JSON manifest ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where}: format_version {data.get('format_version')!r}, this megagpt reads "
                        f"{FORMAT_VERSION}; re-run `megagpt prep` to rewrite it")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{where}: {key}: {first['msg']}; re-run `megagpt prep` to rewrite it") from None
    for name in ("train", "val"):
        if name not in manifest.splits:
            raise DataError(f"{where}: splits.{name} is missing; re-run `megagpt prep` to rewrite it")
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


# ---------------------------------------------------------------- shard files: identity, index, full check


def is_remote(name: str) -> bool:
    """A shard name that is a URL (`pipe:...`, `http://...`): streamed, not opened as a local file."""
    return name.startswith("pipe:") or "://" in name


def index_name(shard_name: str) -> str:
    """The member index written next to a shard: train-000000.tar -> train-000000.idx."""
    return shard_name.removesuffix(".tar") + INDEX_SUFFIX


def check_shard_file(path: str | Path, shard: ShardInfo) -> None:
    """The cheap identity check at open (one stat): the shard exists and has the manifest's size."""
    try:
        size = os.stat(path).st_size
    except OSError:
        raise DataError(f"{path}: shard listed in the manifest is missing") from None
    if shard.bytes is not None and size != shard.bytes:
        raise DataError(f"{path}: truncated or corrupt shard ({size} bytes, the manifest says {shard.bytes})")


def read_index(directory: Path, shard: ShardInfo) -> np.ndarray:
    """A shard's member index (INDEX_RECORD per member), checked against the manifest's index_sha256."""
    path = Path(directory) / index_name(shard.name)
    if shard.index_sha256 is None:
        raise DataError(f"{Path(directory) / shard.name}: {MANIFEST} records no index for this shard; re-run "
                        f"`megagpt prep`")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard's index ({e.strerror}); re-run `megagpt prep`") from None
    if len(raw) != shard.samples * INDEX_RECORD.itemsize or hashlib.sha256(raw).hexdigest() != shard.index_sha256:
        raise DataError(f"{path}: does not match the index_sha256 in {MANIFEST}; the index is corrupt or was "
                        f"replaced: re-run `megagpt prep`")
    return np.frombuffer(raw, dtype=INDEX_RECORD)


def verify_shard(directory: Path, shard: ShardInfo) -> None:
    """Every byte of a local shard: size, the file's sha256, and its index (hash, and the tar's own headers)."""
    path = Path(directory) / shard.name
    check_shard_file(path, shard)
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise DataError(f"{path}: sha256 {digest[:12]}... does not match the manifest's {shard.sha256[:12]}...; "
                        f"the shard is corrupt or was replaced: re-run prep")
    if shard.index_sha256 is None:  # kinds whose shards carry no index (chat) are checked by their hash alone
        return
    index = read_index(directory, shard)
    try:
        with tarfile.open(path, "r:") as tar:
            members = [(info.offset_data, info.size) for info in tar]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar ({e})") from None
    if members != list(zip(index["offset"].tolist(), index["nbytes"].tolist(), strict=True)):
        raise DataError(f"{path}: its members do not match {index_name(shard.name)}; re-run `megagpt prep`")


def verify_main(argv: list[str]) -> int:
    """`megagpt data verify DIR`: read every local shard of a dataset in full and check it against the manifest."""
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="megagpt data verify", description=verify_main.__doc__)
    p.add_argument("dataset_dir")
    dataset = Dataset(p.parse_args(argv).dataset_dir)
    shards = [s for split in dataset.manifest.splits.values() for s in split.shards]
    local = [s for s in shards if not is_remote(s.name)]
    start, bad = time.perf_counter(), 0
    for shard in tqdm(local, desc="verify", unit="shard", disable=None):
        try:
            verify_shard(dataset.dir, shard)
        except DataError as e:
            bad += 1
            print(f"megagpt data verify: {e}", file=sys.stderr)
    if bad:
        raise DataError(f"{dataset.dir}: {bad} of {len(local)} shards failed (listed above)")
    remote = f"; {len(shards) - len(local)} remote shards not checked" if len(local) < len(shards) else ""
    gigabytes = sum(s.bytes or 0 for s in local) / 1e9
    print(f"{dataset.dir}: {len(local)} shards ({gigabytes:.2f} GB) match the manifest "
          f"({time.perf_counter() - start:.1f} s){remote}")
    return 0


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a dataset dir, or of the tokenizer/ folder a run or export dir carries."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        manifest = load_manifest(directory)
        info = manifest.tokenizer
        return with_special_tokens(tokenizer_from_file(info.kind, directory / info.file), manifest.special_tokens)
    for kind, name in TOKENIZER_FILES.items():
        if (directory / name).is_file():
            return tokenizer_from_file(kind, directory / name)
    raise DataError(f"{directory}: no {MANIFEST}, {CHAR_FILE} or {SENTENCEPIECE_FILE}; prepare a dataset with "
                    f"`megagpt prep ...`")


# ---------------------------------------------------------------- an opened dataset


class Dataset:
    """A dataset dir opened once per run: its manifest (read once), that file's hash, and the tokenizer.

    The loader, the evaluation and the checkpoint metadata all take this object instead of re-reading the dir.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._raw = _read(self.dir / MANIFEST)
        self.manifest = parse_manifest(self._raw, self.dir / MANIFEST)
        self.manifest_sha256 = hashlib.sha256(self._raw).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @cached_property
    def tokenizer(self) -> Tokenizer:
        info = self.manifest.tokenizer
        return with_special_tokens(tokenizer_from_file(info.kind, self.dir / info.file),
                                   self.manifest.special_tokens)

    def copy_tokenizer_to(self, dest: Path) -> None:
        """The manifest (as read) and the tokenizer file into dest: a run or export then needs no dataset."""
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).write_bytes(self._raw)
        shutil.copy2(self.dir / self.manifest.tokenizer.file, dest / self.manifest.tokenizer.file)

    def __repr__(self) -> str:
        return f"Dataset({str(self.dir)!r}, kind={self.kind}, vocab_size={self.vocab_size})"


def as_dataset(dataset: Dataset | str | Path) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else Dataset(dataset)
