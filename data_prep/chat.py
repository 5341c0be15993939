"""`megagpt prep chat`: conversations (.jsonl lines {"messages": [...]}) -> a dataset dir of kind `chat`.

Each line is one conversation in the format chat datasets use; it is checked and encoded with the chat template
(megagpt/chat_template.py): token ids plus a loss mask that is 1 exactly on the assistant's content and the
end-of-turn token after it. The tokenizer is another dir's (a dataset, a run or export dir, or a Hugging Face
GPT-2 folder): its file is copied as it is and the chat tokens are appended after its vocabulary (recorded in the
manifest's special_tokens), so a model trained on that tokenizer can be fine-tuned on this data.

Output, in the shard format of megagpt/dataset.py (written by data_prep/sample_dataset.py): per split, tars
whose samples hold `<key>.tokens` (ids in the manifest's token_dtype) and `<key>.mask` (a uint8 per token); one
conversation per sample (megagpt/chat_data.py reads them one per row). Conversations longer than --max-length
are cut at the last assistant turn that fits, inside the first turn when none does, and dropped when nothing the
model would learn is left; the summary counts each case. Bad input is a one-line error naming the file and line.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.sample_dataset import SampleKind, SampleSettings, add_options, prepare_samples, settings_of
from data_prep.sources import ENCODING, utf8_error
from megagpt.chat_template import ConversationError, Encoded, check_messages, encode_conversation, truncate
from megagpt.errors import UserError

CHAT_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass
class ChatPrepSettings(SampleSettings):
    """max_length: tokens per conversation, longer ones cut at a turn boundary; None: no limit (the trainer cuts
    at block_size + 1)."""


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

    def count(self, split: str, conversations: list[Encoded]) -> None:
        self.conversations[split] = len(conversations)
        self.tokens += sum(len(c.ids) for c in conversations)
        self.learned_tokens += int(sum(c.mask.sum() for c in conversations))


# ---------------------------------------------------------------- reading and encoding conversations


def _lines(path: Path):
    """(line number, line) of a .jsonl(.gz), counted on a bar on stderr where it is a terminal."""
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    with io.TextIOWrapper(raw, encoding=ENCODING, errors="strict") as f:
        try:
            yield from tqdm(enumerate(f, 1), desc=f"read {path.name}", unit=" lines", disable=None, leave=False)
        except UnicodeDecodeError as e:
            raise utf8_error(path, e) from None
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


# ---------------------------------------------------------------- the dataset dir


CHAT = SampleKind("chat", "conversation", read_conversations,
                  lambda conversation: [("", conversation)],  # the members <key>.tokens, <key>.mask
                  min_length=2)


def prepare_chat(inputs: list[str | Path], out_dir: str | Path, tokenizer_dir: str | Path | None,
                 settings: ChatPrepSettings | None = None, val_inputs: list[str | Path] | None = None,
                 force: bool = False, extra_settings: dict | None = None,
                 base: tuple | None = None,
                 extra_files: list[Path] | None = None) -> tuple[Path, ChatSummary]:
    """Write the chat dataset dir (via <out>.partial, renamed when complete); its path and the summary.

    The base tokenizer is tokenizer_dir's, or `base` = (tokenizer, its file) when given."""
    summary = ChatSummary()
    out = prepare_samples(CHAT, inputs, out_dir, tokenizer_dir, settings or ChatPrepSettings(), summary,
                          val_inputs, force, extra_settings, base, extra_files)
    return out, summary


# ---------------------------------------------------------------- the command line


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="conversations (.jsonl {\"messages\": [...]}) -> a chat dataset for sft",
                       description=__doc__.split("\n\n")[0])
    add_options(p, ChatPrepSettings(), "conversations",
                tokenizer_help="a dataset, run or export dir, or a Hugging Face GPT-2 folder: the base model's "
                               "tokenizer",
                max_length_help="tokens per conversation (e.g. block_size + 1); longer ones are cut at a turn "
                                "boundary")
    p.set_defaults(run=run)


def run(args) -> Path:
    out, summary = prepare_chat(args.input, args.out, args.tokenizer, settings_of(args, ChatPrepSettings),
                                args.val_input, args.force)
    print(f"megagpt prep chat: {summary.line()}")
    return out
