"""`megagpt prep preferences`: preference pairs (.jsonl lines {"prompt", "chosen", "rejected"}) -> a dataset dir
of kind `preferences`, for the reward, dpo and ppo stages.

Each line is one comparison in the format TRL and DeepSpeed-Chat read:
    {"prompt": [{"role": "user", "content": "..."}, ...] | "one user turn", "chosen": "...", "rejected": "..."}
`prompt` is a conversation that ends with the user's message (megagpt/chat_template.py's rules); `chosen` and
`rejected` are the two candidate assistant replies, as text (or as [{"role": "assistant", "content": "..."}]).
Both completions are encoded with the chat template as the prompt followed by the reply:

    <|user|> question <|end|> <|assistant|> reply <|end|>
    mask:  0 ...                0           1 ... 1

with the mask 1 exactly on the reply and its end-of-turn token (earlier assistant turns of the prompt are
context: 0). Shards, in the format of megagpt/dataset.py: per pair the members `<key>.chosen.tokens`,
`<key>.chosen.mask`, `<key>.rejected.tokens`, `<key>.rejected.mask` (megagpt/preference_data.py reads them).
Pairs with a completion longer than --max-length tokens are dropped, and so are pairs whose two replies are the
same text (they carry no preference); the summary counts both. Bad input is a one-line error naming file and line.
The tokenizer is another dir's (a dataset, run or export dir, or a GPT-2 folder), as for `megagpt prep chat`.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.chat import (
    CHAT_SUFFIXES,
    _known_chars,
    _lines,
    base_tokenizer,
    chat_tokenizer,
    seal_dataset,
    split_indices,
)
from data_prep.sources import expand_inputs
from megagpt.chat_template import ConversationError, Encoded, check_messages, encode_conversation
from megagpt.dataset import sha256_file, shard_name, token_dtype_for
from megagpt.errors import UserError

SIDES = ("chosen", "rejected")


@dataclass
class PreferenceSettings:
    val_fraction: float = 0.05  # of the pairs, drawn at random (seeded); ignored with val inputs
    max_length: int | None = None  # tokens per completion (prompt + reply); longer pairs are dropped
    unknown_chars: str = "error"  # char tokenizers: error | drop characters outside the vocabulary
    seed: int = 1337
    shard_size_mb: float = 256.0


@dataclass
class PreferenceSummary:
    pairs: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: int = 0
    too_long: int = 0
    identical: int = 0
    dropped_chars: int = 0

    def line(self) -> str:
        p = self.pairs
        return (f"{p['train'] + p['val']} pairs (train {p['train']}, val {p['val']}), {self.tokens} tokens; "
                f"dropped: {self.too_long} longer than --max-length, {self.identical} with identical replies; "
                f"{self.dropped_chars} unknown characters dropped")


@dataclass
class Pair:
    chosen: Encoded
    rejected: Encoded


# ---------------------------------------------------------------- one record -> a pair


def _reply_text(value, where: str, side: str) -> str:
    """A reply given as text, or as a one-message assistant list (TRL's conversational format)."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise UserError(f"{where}: \"{side}\" must be the reply's text (or [{{\"role\": \"assistant\", \"content\": "
                    f"\"...\"}}])")


def _prompt_pairs(value, where: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    try:
        return check_messages(value, final_role="user")
    except ConversationError as e:
        raise UserError(f"{where}: \"prompt\": {e}") from None


def encode_completion(tokenizer, prompt: list[tuple[str, str]], reply: str) -> Encoded:
    """The prompt then the reply, with the mask 1 only on the reply and its end-of-turn token."""
    encoded = encode_conversation(tokenizer, [*prompt, ("assistant", reply)])
    reply_len = len(tokenizer.encode(reply)) + 1  # + <|end|>
    mask = np.zeros_like(encoded.mask)
    mask[len(encoded.ids) - reply_len:] = 1
    return Encoded(encoded.ids, mask, [len(encoded.ids)])


def encode_record(line: str, where: str, tokenizer, settings: PreferenceSettings,
                  summary: PreferenceSummary) -> Pair | None:
    """A checked, encoded pair; None when it is dropped (counted in the summary)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or not all(key in record for key in ("prompt", *SIDES)):
        raise UserError(f"{where}: expected an object {{\"prompt\": ..., \"chosen\": \"...\", \"rejected\": \"...\"}}")
    prompt = _prompt_pairs(record["prompt"], where)
    replies = [_reply_text(record[side], where, side) for side in SIDES]
    if tokenizer.kind == "char":
        prompt = [(role, _known_chars(text, tokenizer, where, i, settings, summary))
                  for i, (role, text) in enumerate(prompt)]
        replies = [_known_chars(text, tokenizer, f"{where}: \"{side}\"", 0, settings, summary)
                   for side, text in zip(SIDES, replies, strict=True)]
    if replies[0] == replies[1]:
        summary.identical += 1
        return None
    chosen, rejected = (encode_completion(tokenizer, prompt, reply) for reply in replies)
    if settings.max_length is not None and max(len(chosen.ids), len(rejected.ids)) > settings.max_length:
        summary.too_long += 1
        return None
    return Pair(chosen, rejected)


def read_pairs(paths: list[Path], tokenizer, settings: PreferenceSettings, summary: PreferenceSummary) -> list[Pair]:
    out = []
    for path in paths:
        if not path.name.endswith(CHAT_SUFFIXES):
            raise UserError(f"--input {path}: expected .jsonl or .jsonl.gz preference pairs")
        for line_no, line in _lines(path):
            if line.strip():
                pair = encode_record(line, f"{path}:{line_no}", tokenizer, settings, summary)
                if pair is not None:
                    out.append(pair)
    return out


# ---------------------------------------------------------------- shards and manifest


def write_split(pairs: list[Pair], split: str, out: Path, dtype: str, shard_bytes: int) -> list[dict]:
    """The split's tars (a new one once shard_bytes of payload is reached; at least one) and their entries."""
    groups, size = [[]], 0
    for pair in pairs:
        if groups[-1] and size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(pair)
        size += (len(pair.chosen.ids) + len(pair.rejected.ids)) * (np.dtype(dtype).itemsize + 1)
    return [_write_tar(group, out / shard_name(split, k), dtype) for k, group in enumerate(groups)]


def _write_tar(pairs: list[Pair], path: Path, dtype: str) -> dict:
    """A reproducible tar (fixed mtime, owner and mode): the same pairs give the same bytes."""
    little = np.dtype(dtype).newbyteorder("<")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, pair in enumerate(pairs):
            for side, encoded in zip(SIDES, (pair.chosen, pair.rejected), strict=True):
                for member, payload in (("tokens", encoded.ids.astype(little).tobytes()),
                                        ("mask", encoded.mask.astype(np.uint8).tobytes())):
                    info = tarfile.TarInfo(f"{i:06d}.{side}.{member}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o444
                    info.uname = info.gname = "megagpt"
                    tar.addfile(info, io.BytesIO(payload))
    tokens = int(sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs))
    return {"name": path.name, "samples": len(pairs), "tokens": tokens, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def prepare_preferences(inputs: list[str | Path], out_dir: str | Path, tokenizer_dir: str | Path | None,
                        settings: PreferenceSettings | None = None, val_inputs: list[str | Path] | None = None,
                        force: bool = False, extra_settings: dict | None = None,
                        base: tuple | None = None) -> tuple[Path, PreferenceSummary]:
    """Write the preferences dataset dir (via <out>.partial, renamed when complete); its path and the summary.

    The base tokenizer is tokenizer_dir's, or `base` = (tokenizer, its file) when given."""
    settings = settings or PreferenceSettings()
    _check(settings)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"--out {out_dir}: already exists; pass --force to replace it")
    base, base_file = base or base_tokenizer(tokenizer_dir)
    tokenizer = chat_tokenizer(base)
    summary = PreferenceSummary()
    paths = expand_inputs(inputs)
    pairs = read_pairs(paths, tokenizer, settings, summary)
    if val_inputs:
        val_paths = expand_inputs(val_inputs)
        splits = {"train": pairs, "val": read_pairs(val_paths, tokenizer, settings, summary)}
        paths += val_paths
    else:
        train, val = split_indices(len(pairs), settings.val_fraction, settings.seed)
        splits = {"train": [pairs[i] for i in train], "val": [pairs[i] for i in val]}
    if not splits["train"]:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no pair left for the train split ({summary.line()})")
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dtype = token_dtype_for(tokenizer.vocab_size)
    shard_bytes = int(settings.shard_size_mb * (1 << 20))
    written = {name: write_split(items, name, work, dtype, shard_bytes) for name, items in splits.items()}
    for name, items in splits.items():
        summary.pairs[name] = len(items)
        summary.tokens += sum(len(p.chosen.ids) + len(p.rejected.ids) for p in items)
    seal_dataset(work, out_dir, "preferences", (base, base_file, tokenizer), dtype, written, paths,
                 {"summary": asdict(summary)},
                 {**asdict(settings), "tokenizer_from": str(tokenizer_dir or base_file), **(extra_settings or {})})
    return out_dir, summary


def _check(s: PreferenceSettings) -> None:
    if not 0.0 <= s.val_fraction < 1.0:
        raise UserError(f"--val-fraction {s.val_fraction}: must be in [0, 1)")
    if s.max_length is not None and s.max_length < 3:
        raise UserError(f"--max-length {s.max_length}: must be at least 3 tokens")
    if s.unknown_chars not in ("error", "drop"):
        raise UserError(f"--unknown-chars {s.unknown_chars!r}: expected error or drop")
    if s.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {s.shard_size_mb}: must be positive")


# ---------------------------------------------------------------- the command line


def add_parser(sub) -> None:
    d = PreferenceSettings()
    p = sub.add_parser("preferences", help="preference pairs (.jsonl {\"prompt\", \"chosen\", \"rejected\"}) -> a "
                       "dataset for the reward, dpo and ppo stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+", help=".jsonl or .jsonl.gz files (or dirs, globs)")
    p.add_argument("--tokenizer", required=True,
                   help="a dataset, run or export dir (e.g. the SFT run), or a Hugging Face GPT-2 folder")
    p.add_argument("--out", required=True, help="dataset dir to create (via DIR.partial, then renamed)")
    p.add_argument("--val-input", nargs="+", help="pairs for the val split (instead of --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="the share of pairs drawn at random for the val split")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per completion, prompt included (e.g. block_size + 1); longer pairs are dropped")
    p.add_argument("--unknown-chars", choices=["error", "drop"], default=d.unknown_chars,
                   help="char tokenizers: characters outside the vocabulary are an error, or dropped")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-size-mb", type=float, default=d.shard_size_mb)
    p.add_argument("--force", action="store_true", help="replace --out when it already exists")
    p.set_defaults(run=run)


def run(args) -> Path:
    settings = PreferenceSettings(args.val_fraction, args.max_length, args.unknown_chars, args.seed,
                                  args.shard_size_mb)
    out, summary = prepare_preferences(args.input, args.out, args.tokenizer, settings, args.val_input, args.force)
    print(f"megagpt prep preferences: {summary.line()}")
    return out
