"""The dataset directory's format: file names, version, the manifest schema, hashing, and the opened `Dataset`.

A dataset dir is what `data_prep` writes and what training reads:
  manifest.json         this module's `Manifest` (format version, dataset kind, tokenizer, vocabulary, token
                        dtype, per split its shards with sizes and sha256, the sources and prep settings)
  tokenizer.json|.model the char vocabulary or the sentencepiece model (megagpt/tokenizer.py)
  train-000000.tar ...  webdataset shards; each member holds a packed run of little-endian token ids
Dataset kinds are a field of the manifest, not new formats: `tokens` (packed runs, pre-training) today;
`chat` and `preferences` add per-sample fields to the same shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megagpt.errors import UserError
from megagpt.tokenizer import CHAR_FILE, SENTENCEPIECE_FILE, Tokenizer, tokenizer_from_file, with_special_tokens

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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


class SplitInfo(_Strict):
    tokens: int = Field(ge=0)
    samples: int = Field(ge=0)
    shards: list[ShardInfo]


class TokenizerInfo(_Strict):
    kind: Literal["char", "sentencepiece", "huggingface"]
    file: str


class Manifest(_Strict):
    format_version: Literal[1]
    kind: Literal["tokens", "chat"] = Field(
        "tokens", description="tokens: packed runs of token ids (pre-training); chat: one conversation per sample, "
        "token ids plus a loss mask (data_prep/chat.py)")
    tokenizer: TokenizerInfo
    vocab_size: int = Field(ge=1)
    token_dtype: Literal["uint16", "uint32"]
    eos_id: int | None = None
    sample_tokens: int | None = Field(None, ge=1, description="tokens per tar member (a packed run)")
    special_tokens: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, SplitInfo]
    sources: Any = None  # what prep read: files with sizes and sha256
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
