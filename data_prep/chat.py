"""`megagpt prep chat`: conversations (.jsonl lines {"messages": [...]}) -> a dataset dir of kind `chat`.

Each line is one conversation in the format chat datasets use; it is checked and encoded with the chat template
(megagpt/chat_template.py): token ids plus a loss mask that is 1 exactly on the assistant's content and the
end-of-turn token after it. The tokenizer is another dir's (a dataset, a run or export dir, or a Hugging Face
GPT-2 folder): its file is copied as it is and the chat tokens are appended after its vocabulary (recorded in the
manifest's special_tokens), so a model trained on that tokenizer can be fine-tuned on this data.

Output, in the shard format of megagpt/dataset.py: per split, tars whose samples hold `<key>.tokens` (ids in the
manifest's token_dtype) and `<key>.mask` (a uint8 per token); one conversation per sample (megagpt/chat_data.py
reads them one per row). Conversations longer than --max-length are cut at the last assistant turn that fits,
inside the first turn when none does, and dropped when nothing the model would learn is left; the summary
counts each case. Bad input is a one-line error naming the file and line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.sources import expand_inputs
from megagpt.chat_template import CHAT_TOKENS, ConversationError, Encoded, check_messages, encode_conversation, truncate
from megagpt.dataset import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    load_manifest,
    sha256_file,
    shard_name,
    token_dtype_for,
    write_manifest,
    write_shard_table,
)
from megagpt.errors import UserError
from megagpt.tokenizer import HuggingFaceTokenizer, WithSpecialTokens, tokenizer_from_file

HF_TOKENIZER = "tokenizer.json"
CHAT_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass
class ChatPrepSettings:
    val_fraction: float = 0.05  # of the conversations, drawn at random (seeded); ignored with val inputs
    max_length: int | None = None  # tokens per conversation; None: no limit (the trainer cuts at block_size+1)
    unknown_chars: str = "error"  # char tokenizers: error | drop characters outside the vocabulary
    seed: int = 1337
    shard_size_mb: float = 256.0


@dataclass
class ChatSummary:
    """What prep did, for the console and the manifest."""

    conversations: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: int = 0
    learned_tokens: int = 0  # mask 1
    truncated_at_turn: int = 0
    cut_inside_turn: int = 0
    dropped: int = 0  # nothing learnable within --max-length
    dropped_chars: int = 0

    def line(self) -> str:
        c = self.conversations
        return (f"{c['train'] + c['val']} conversations (train {c['train']}, val {c['val']}), {self.tokens} tokens, "
                f"{self.learned_tokens} of them the assistant's; longer than --max-length: "
                f"{self.truncated_at_turn} cut at a turn boundary, {self.cut_inside_turn} cut inside a turn, "
                f"{self.dropped} dropped; {self.dropped_chars} unknown characters dropped")


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
            path = folder / manifest.tokenizer.file
            return tokenizer_from_file(manifest.tokenizer.kind, path), path
    if (directory / HF_TOKENIZER).is_file():
        return tokenizer_from_file(HuggingFaceTokenizer.kind, directory / HF_TOKENIZER), directory / HF_TOKENIZER
    raise UserError(f"--tokenizer {directory}: no {MANIFEST}, tokenizer/{MANIFEST} or {HF_TOKENIZER} here; pass a "
                    f"dataset dir, a run or export dir, or a Hugging Face GPT-2 folder")


def chat_tokenizer(base) -> WithSpecialTokens:
    return WithSpecialTokens(base, {name: base.vocab_size + i for i, name in enumerate(CHAT_TOKENS)})


# ---------------------------------------------------------------- reading and encoding conversations


def _lines(path: Path):
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    with io.TextIOWrapper(raw, encoding="utf-8", errors="strict") as f:
        try:
            yield from enumerate(f, 1)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: cannot read: {e}") from None


def read_conversations(paths: list[Path], tokenizer, settings: ChatPrepSettings,
                       summary: ChatSummary) -> list[Encoded]:
    """Every conversation of the files, checked, encoded and truncated, in file and line order."""
    out = []
    for path in paths:
        if not path.name.endswith(CHAT_SUFFIXES):
            raise UserError(f"--input {path}: expected .jsonl or .jsonl.gz conversations")
        for line_no, line in _lines(path):
            if not line.strip():
                continue
            encoded = _encode_line(line, f"{path}:{line_no}", tokenizer, settings, summary)
            if settings.max_length is not None:
                encoded, what = truncate(encoded, settings.max_length)
                summary.truncated_at_turn += what == "turn"
                summary.cut_inside_turn += what == "cut"
                summary.dropped += what == "dropped"
            if encoded is not None:
                out.append(encoded)
    return out


def _encode_line(line: str, where: str, tokenizer, settings: ChatPrepSettings, summary: ChatSummary) -> Encoded:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError(f"{where}: expected an object {{\"messages\": [...]}}")
    try:
        pairs = check_messages(record["messages"])
    except ConversationError as e:
        raise UserError(f"{where}: {e}") from None
    if tokenizer.kind == "char":
        pairs = [(role, _known_chars(content, tokenizer, where, i, settings, summary))
                 for i, (role, content) in enumerate(pairs)]
    return encode_conversation(tokenizer, pairs)


def _known_chars(text: str, tokenizer, where: str, index: int, settings: ChatPrepSettings,
                 summary: ChatSummary) -> str:
    known = set(tokenizer.chars)
    unknown = [c for c in text if c not in known]
    if not unknown:
        return text
    if settings.unknown_chars == "error":
        shown = " ".join(repr(c) for c in dict.fromkeys(unknown))
        raise UserError(f"{where}: message {index}: character(s) {shown} not in the char tokenizer's vocabulary "
                        f"({len(known)} chars); pass --unknown-chars drop to drop them")
    summary.dropped_chars += len(unknown)
    return "".join(c for c in text if c in known)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) conversation indices, each in input order: a seeded random val_fraction for val."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [i for i in range(n) if i not in chosen], sorted(chosen)


# ---------------------------------------------------------------- shards and manifest


def write_split(conversations: list[Encoded], split: str, out: Path, dtype: str, shard_bytes: int) -> list[dict]:
    """The split's tars (a new one once shard_bytes of payload is reached; at least one) and their entries."""
    groups, size = [[]], 0
    for conversation in conversations:
        if groups[-1] and size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(conversation)
        size += len(conversation.ids) * (np.dtype(dtype).itemsize + 1)
    return [_write_tar(group, out / shard_name(split, k), dtype) for k, group in enumerate(groups)]


def _write_tar(conversations: list[Encoded], path: Path, dtype: str) -> dict:
    """A reproducible tar (fixed mtime, owner and mode): the same conversations give the same bytes."""
    little = np.dtype(dtype).newbyteorder("<")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, conversation in enumerate(conversations):
            for member, payload in (("tokens", conversation.ids.astype(little).tobytes()),
                                    ("mask", conversation.mask.astype(np.uint8).tobytes())):
                info = tarfile.TarInfo(f"{i:06d}.{member}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                info.uname = info.gname = "megagpt"
                tar.addfile(info, io.BytesIO(payload))
    return {"name": path.name, "samples": len(conversations),
            "tokens": int(sum(len(c.ids) for c in conversations)), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def prepare_chat(inputs: list[str | Path], out_dir: str | Path, tokenizer_dir: str | Path | None,
                 settings: ChatPrepSettings | None = None, val_inputs: list[str | Path] | None = None,
                 force: bool = False, extra_settings: dict | None = None,
                 base: tuple | None = None) -> tuple[Path, ChatSummary]:
    """Write the chat dataset dir (via <out>.partial, renamed when complete); its path and the summary.

    The base tokenizer is tokenizer_dir's, or `base` = (tokenizer, its file) when given."""
    settings = settings or ChatPrepSettings()
    _check(settings)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"--out {out_dir}: already exists; pass --force to replace it")
    base, base_file = base or base_tokenizer(tokenizer_dir)
    tokenizer = chat_tokenizer(base)
    summary = ChatSummary()
    paths = expand_inputs(inputs)
    conversations = read_conversations(paths, tokenizer, settings, summary)
    if val_inputs:
        val_paths = expand_inputs(val_inputs)
        splits = {"train": conversations, "val": read_conversations(val_paths, tokenizer, settings, summary)}
        paths += val_paths
    else:
        train, val = split_indices(len(conversations), settings.val_fraction, settings.seed)
        splits = {"train": [conversations[i] for i in train], "val": [conversations[i] for i in val]}
    if not splits["train"]:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no conversation left for the train split")
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dtype = token_dtype_for(tokenizer.vocab_size)
    shard_bytes = int(settings.shard_size_mb * (1 << 20))
    written = {name: write_split(items, name, work, dtype, shard_bytes) for name, items in splits.items()}
    for name, items in splits.items():
        summary.conversations[name] = len(items)
        summary.tokens += sum(len(c.ids) for c in items)
        summary.learned_tokens += int(sum(c.mask.sum() for c in items))
    seal_dataset(work, out_dir, "chat", (base, base_file, tokenizer), dtype, written, paths,
                 {"summary": asdict(summary)},
                 {**asdict(settings), "tokenizer_from": str(tokenizer_dir or base_file), **(extra_settings or {})})
    return out_dir, summary


def seal_dataset(work: Path, out_dir: Path, kind: str, tokenizers: tuple, dtype: str, splits: dict,
                 paths: list[Path], sources: dict, settings: dict) -> None:
    """A per-sample dataset (chat, preferences) made whole: the base tokenizer file, each split's shard table
    (from `splits`: its shards' entries, in order) and the manifest into <out>.partial, which then replaces
    out_dir."""
    base, base_file, tokenizer = tokenizers
    shutil.copy2(base_file, work / base_file.name)
    files = [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths]
    manifest = Manifest(
        format_version=FORMAT_VERSION, kind=kind,
        tokenizer={"kind": base.kind, "file": base_file.name}, vocab_size=tokenizer.vocab_size, token_dtype=dtype,
        eos_id=base.eos_id, special_tokens=tokenizer.special_tokens,
        splits={name: write_shard_table(work, name, shards) for name, shards in splits.items()},
        sources={"files": files, **sources}, settings=settings,
    )
    write_manifest(work, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)


def _check(s: ChatPrepSettings) -> None:
    if not 0.0 <= s.val_fraction < 1.0:
        raise UserError(f"--val-fraction {s.val_fraction}: must be in [0, 1)")
    if s.max_length is not None and s.max_length < 2:
        raise UserError(f"--max-length {s.max_length}: must be at least 2 tokens")
    if s.unknown_chars not in ("error", "drop"):
        raise UserError(f"--unknown-chars {s.unknown_chars!r}: expected error or drop")
    if s.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {s.shard_size_mb}: must be positive")


# ---------------------------------------------------------------- the command line


def add_parser(sub) -> None:
    d = ChatPrepSettings()
    p = sub.add_parser("chat", help="conversations (.jsonl {\"messages\": [...]}) -> a chat dataset for sft",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+", help=".jsonl or .jsonl.gz files (or dirs, globs)")
    p.add_argument("--tokenizer", required=True,
                   help="a dataset, run or export dir, or a Hugging Face GPT-2 folder: the base model's tokenizer")
    p.add_argument("--out", required=True, help="dataset dir to create (via DIR.partial, then renamed)")
    p.add_argument("--val-input", nargs="+", help="conversations for the val split (instead of --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="the share of conversations drawn at random for the val split")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per conversation (e.g. block_size + 1); longer ones are cut at a turn boundary")
    p.add_argument("--unknown-chars", choices=["error", "drop"], default=d.unknown_chars,
                   help="char tokenizers: characters outside the vocabulary are an error, or dropped")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-size-mb", type=float, default=d.shard_size_mb)
    p.add_argument("--force", action="store_true", help="replace --out when it already exists")
    p.set_defaults(run=run)


def run(args) -> Path:
    settings = ChatPrepSettings(args.val_fraction, args.max_length, args.unknown_chars, args.seed,
                                args.shard_size_mb)
    out, summary = prepare_chat(args.input, args.out, args.tokenizer, settings, args.val_input, args.force)
    print(f"megagpt prep chat: {summary.line()}")
    return out
