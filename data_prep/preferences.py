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

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.chat import CHAT_SUFFIXES, _known_chars, _lines
from data_prep.sample_dataset import SampleKind, SampleSettings, add_options, prepare_samples, settings_of
from megagpt.chat_template import ConversationError, Encoded, check_messages, encode_conversation
from megagpt.errors import UserError

SIDES = ("chosen", "rejected")


@dataclass
class PreferenceSettings(SampleSettings):
    """max_length: tokens per completion (prompt + reply); pairs with a longer one are dropped."""


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

    def count(self, split: str, pairs: list[Pair]) -> None:
        self.pairs[split] = len(pairs)
        self.tokens += sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)


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


# ---------------------------------------------------------------- the dataset dir


def _sides(pair: Pair) -> list[tuple[str, Encoded]]:
    """A pair's completions in tar order: the members `<key>.chosen.*`, then `<key>.rejected.*`."""
    return [(f"{side}.", getattr(pair, side)) for side in SIDES]


PREFERENCES = SampleKind("preferences", "pair", read_pairs, _sides, min_length=3)


def prepare_preferences(inputs: list[str | Path], out_dir: str | Path, tokenizer_dir: str | Path | None,
                        settings: PreferenceSettings | None = None, val_inputs: list[str | Path] | None = None,
                        force: bool = False, extra_settings: dict | None = None,
                        base: tuple | None = None,
                        extra_files: list[Path] | None = None) -> tuple[Path, PreferenceSummary]:
    """Write the preferences dataset dir (via <out>.partial, renamed when complete); its path and the summary.

    The base tokenizer is tokenizer_dir's, or `base` = (tokenizer, its file) when given."""
    summary = PreferenceSummary()
    out = prepare_samples(PREFERENCES, inputs, out_dir, tokenizer_dir, settings or PreferenceSettings(), summary,
                          val_inputs, force, extra_settings, base, extra_files)
    return out, summary


# ---------------------------------------------------------------- the command line


def add_parser(sub) -> None:
    p = sub.add_parser("preferences", help="preference pairs (.jsonl {\"prompt\", \"chosen\", \"rejected\"}) -> a "
                       "dataset for the reward, dpo and ppo stages", description=__doc__.split("\n\n")[0])
    add_options(p, PreferenceSettings(), "pairs",
                tokenizer_help="a dataset, run or export dir (e.g. the SFT run), or a Hugging Face GPT-2 folder",
                max_length_help="tokens per completion, prompt included (e.g. block_size + 1); longer pairs are "
                                "dropped")
    p.set_defaults(run=run)


def run(args) -> Path:
    out, summary = prepare_preferences(args.input, args.out, args.tokenizer, settings_of(args, PreferenceSettings),
                                       args.val_input, args.force)
    print(f"megagpt prep preferences: {summary.line()}")
    return out
