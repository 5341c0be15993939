"""Writing a per-sample dataset dir (kinds chat and preferences): tokenizer, train/val split, shards, manifest.

What `megagpt prep chat` and `megagpt prep preferences` share: their options (`SampleSettings`, `add_options`)
and the writing. A `SampleKind` says how a kind reads its samples and which encoded sequences one sample holds;
`prepare_samples` does the rest: the base tokenizer of another dir
with the chat tokens appended after its vocabulary, the train/val split (a seeded random share, or val inputs),
one reproducible tar per shard_size_mb of payload, and the manifest, all built in <out>.partial, which replaces
out_dir once complete. Sample k of a shard is the tar key `{k:06d}`; each of its sequences is the members
`<key>.<prefix>tokens` (ids in the manifest's token_dtype, little-endian) and `<key>.<prefix>mask` (a uint8 per
token).
"""

from __future__ import annotations

import io
import math
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.out_dir import replace_out_dir, work_dir_for
from data_prep.sources import expand_inputs
from megagpt.chat_template import CHAT_TOKENS, Encoded
from megagpt.dataset import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    load_manifest,
    manifest_tokenizer,
    sha256_file,
    shard_name,
    token_dtype_for,
    tokenizer_info,
    write_manifest,
    write_shard_table,
)
from megagpt.errors import UserError, check_seed
from megagpt.tokenizer import HuggingFaceTokenizer, WithSpecialTokens, tokenizer_from_file

HF_TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class SampleKind:
    """What differs between the per-sample dataset kinds."""

    name: str  # the manifest's kind
    noun: str  # one sample, in the error for an empty train split: "conversation", "pair"
    read: Callable  # (paths, tokenizer, settings, summary) -> the files' samples, in file and line order
    parts: Callable[..., list[tuple[str, Encoded]]]  # sample -> its (member prefix, sequence)s, in tar order
    min_length: int  # the smallest --max-length that can hold a sample


@dataclass
class SampleSettings:
    """The options of a per-sample prep command; what max_length does to a longer sample is the kind's."""

    val_fraction: float = 0.05  # of the samples, drawn at random (seeded); ignored with val inputs
    max_length: int | None = None  # tokens per sample (a pair: per completion); None: no limit
    unknown_chars: str = "error"  # char tokenizers: error | drop characters outside the vocabulary
    seed: int = 1337
    shard_size_mb: float = 256.0


def check_settings(s: SampleSettings, min_length: int) -> None:
    if not 0.0 <= s.val_fraction < 1.0:
        raise UserError(f"--val-fraction {s.val_fraction}: must be in [0, 1)")
    if s.max_length is not None and s.max_length < min_length:
        raise UserError(f"--max-length {s.max_length}: must be at least {min_length} tokens")
    if s.unknown_chars not in ("error", "drop"):
        raise UserError(f"--unknown-chars {s.unknown_chars!r}: expected error or drop")
    if not 0 < s.shard_size_mb < math.inf:  # also refuses nan
        raise UserError(f"--shard-size-mb {s.shard_size_mb}: must be a positive number of megabytes")


def add_options(p, defaults: SampleSettings, samples: str, tokenizer_help: str, max_length_help: str) -> None:
    """The options of a per-sample prep command on its sub-parser `p`; `samples` names them in the help."""
    p.add_argument("--input", required=True, nargs="+", help=".jsonl or .jsonl.gz files (or dirs, globs)")
    p.add_argument("--tokenizer", required=True, help=tokenizer_help)
    p.add_argument("--out", required=True, help="dataset dir to create (via DIR.partial, then renamed)")
    p.add_argument("--val-input", nargs="+", help=f"{samples} for the val split (instead of --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help=f"the share of {samples} drawn at random for the val split")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help=max_length_help)
    p.add_argument("--unknown-chars", choices=["error", "drop"], default=defaults.unknown_chars,
                   help="char tokenizers: characters outside the vocabulary are an error, or dropped")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--shard-size-mb", type=float, default=defaults.shard_size_mb)
    p.add_argument("--force", action="store_true", help="replace --out when it already exists")


def settings_of(args, settings_class: type[SampleSettings]) -> SampleSettings:
    """The parsed options of add_options as settings_class."""
    return settings_class(args.val_fraction, args.max_length, args.unknown_chars, check_seed(args.seed),
                          args.shard_size_mb)


# ---------------------------------------------------------------- the tokenizer of another dir


def base_tokenizer(directory: str | Path):
    """(tokenizer without chat tokens, its file) of a dataset dir, a run or export dir, or a GPT-2 folder."""
    directory = Path(directory)
    for folder in (directory, directory / "tokenizer"):
        if (folder / MANIFEST).is_file():
            manifest = load_manifest(folder)
            extra = [name for name in manifest.special_tokens if name not in CHAT_TOKENS]
            if extra:
                raise UserError(f"--tokenizer {directory}: its special tokens {extra} are not the chat template's")
            tokenizer = manifest_tokenizer(folder, manifest)  # checked against the manifest
            return getattr(tokenizer, "base", tokenizer), folder / manifest.tokenizer.file
    if (directory / HF_TOKENIZER).is_file():
        return tokenizer_from_file(HuggingFaceTokenizer.kind, directory / HF_TOKENIZER), directory / HF_TOKENIZER
    raise UserError(f"--tokenizer {directory}: no {MANIFEST}, tokenizer/{MANIFEST} or {HF_TOKENIZER} here; pass a "
                    f"dataset dir, a run or export dir, or a Hugging Face GPT-2 folder")


def chat_tokenizer(base) -> WithSpecialTokens:
    return WithSpecialTokens(base, {name: base.vocab_size + i for i, name in enumerate(CHAT_TOKENS)})


# ---------------------------------------------------------------- the whole command


def prepare_samples(kind: SampleKind, inputs: list[str | Path], out_dir: str | Path, tokenizer_dir,
                    settings: SampleSettings, summary, val_inputs: list[str | Path] | None = None,
                    force: bool = False, extra_settings: dict | None = None, base: tuple | None = None,
                    extra_files: list[Path] | None = None) -> Path:
    """Write kind's dataset dir (via <out>.partial, renamed when complete); its path.

    The base tokenizer is tokenizer_dir's, or `base` = (tokenizer, its file) when given; `summary` (the kind's)
    counts what is read and dropped, then each split's samples (`summary.count(split, samples)`); `extra_files`
    (a prep's own files, e.g. its question lists) are moved into the dir before it is put in place."""
    check_settings(settings, kind.min_length)
    out_dir = Path(out_dir)
    work = work_dir_for(out_dir, force)
    base, base_file = base or base_tokenizer(tokenizer_dir)
    tokenizer = chat_tokenizer(base)
    splits, paths = read_splits(kind, inputs, val_inputs, tokenizer, settings, summary)
    if not splits["train"]:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no {kind.noun} left for the train split "
                        f"({summary.line()})")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dtype = token_dtype_for(tokenizer.vocab_size)
    shard_bytes = int(settings.shard_size_mb * (1 << 20))
    written = {name: write_split(kind, items, name, work, dtype, shard_bytes) for name, items in splits.items()}
    for name, items in splits.items():
        summary.count(name, items)
    seal_dataset(work, out_dir, kind.name, (base, base_file, tokenizer), dtype, written, paths,
                 {"summary": asdict(summary)},
                 {**asdict(settings), "tokenizer_from": str(tokenizer_dir or base_file), **(extra_settings or {})},
                 extra_files or [])
    return out_dir


def read_splits(kind: SampleKind, inputs: list, val_inputs: list | None, tokenizer, settings,
                summary) -> tuple[dict[str, list], list[Path]]:
    """({"train": samples, "val": samples}, every input file): val from val_inputs, else a seeded random share."""
    paths = expand_inputs(inputs)
    samples = kind.read(paths, tokenizer, settings, summary)
    if val_inputs:
        val_paths = expand_inputs(val_inputs)
        return {"train": samples, "val": kind.read(val_paths, tokenizer, settings, summary)}, paths + val_paths
    train, val = split_indices(len(samples), settings.val_fraction, settings.seed)
    return {"train": [samples[i] for i in train], "val": [samples[i] for i in val]}, paths


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) sample indices, each in input order: a seeded random val_fraction for val."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [i for i in range(n) if i not in chosen], sorted(chosen)


# ---------------------------------------------------------------- shards and manifest


def write_split(kind: SampleKind, samples: list, split: str, out: Path, dtype: str, shard_bytes: int) -> list[dict]:
    """The split's tars (a new one once shard_bytes of payload is reached; at least one) and their entries."""
    groups, size = [[]], 0
    for sample in samples:
        if groups[-1] and size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(sample)
        size += sum(len(encoded.ids) for _, encoded in kind.parts(sample)) * (np.dtype(dtype).itemsize + 1)
    return [_write_tar(kind, group, out / shard_name(split, k), dtype) for k, group in enumerate(groups)]


def _write_tar(kind: SampleKind, samples: list, path: Path, dtype: str) -> dict:
    """A reproducible tar (fixed mtime, owner and mode): the same samples give the same bytes."""
    little = np.dtype(dtype).newbyteorder("<")
    tokens = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, sample in enumerate(samples):
            for prefix, encoded in kind.parts(sample):
                tokens += len(encoded.ids)
                for member, payload in (("tokens", encoded.ids.astype(little).tobytes()),
                                        ("mask", encoded.mask.astype(np.uint8).tobytes())):
                    info = tarfile.TarInfo(f"{i:06d}.{prefix}{member}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o444
                    info.uname = info.gname = "megagpt"
                    tar.addfile(info, io.BytesIO(payload))
    return {"name": path.name, "samples": len(samples), "tokens": tokens, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def seal_dataset(work: Path, out_dir: Path, kind: str, tokenizers: tuple, dtype: str, splits: dict,
                 paths: list[Path], sources: dict, settings: dict, extra_files: list[Path]) -> None:
    """A per-sample dataset made whole: the base tokenizer file, each split's shard table (from `splits`: its
    shards' entries, in order), the extra files and the manifest into <out>.partial, which then replaces
    out_dir."""
    base, base_file, tokenizer = tokenizers
    shutil.copy2(base_file, work / base_file.name)
    kept = {extra.resolve(): out_dir / extra.name for extra in extra_files}  # an input kept inside: its final path
    files = [{"path": str(kept.get(p.resolve(), p)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in paths]
    manifest = Manifest(
        format_version=FORMAT_VERSION, kind=kind,
        tokenizer=tokenizer_info(base.kind, work / base_file.name), vocab_size=tokenizer.vocab_size, token_dtype=dtype,
        eos_id=base.eos_id, special_tokens=tokenizer.special_tokens,
        splits={name: write_shard_table(work, name, shards) for name, shards in splits.items()},
        sources={"files": files, **sources}, settings=settings,
    )
    for extra in extra_files:  # after `files` were hashed: an extra file may be one of the inputs
        shutil.move(extra, work / extra.name)
    write_manifest(work, manifest)
    replace_out_dir(work, out_dir)
