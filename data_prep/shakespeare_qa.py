"""`megagpt prep shakespeare-qa`: question/answer conversations about Tiny Shakespeare, from the play's structure.

The text is a sequence of speeches, "SPEAKER:" on a line and the speech's lines under it, separated by blank
lines. Two kinds of questions come out of it:
  who:  "Who says: <a line>"      -> the speaker ("PETRUCHIO"): a short answer, scored by exact match;
  next: "What follows: <a line>"  -> the next line of the same speech: a free-text answer (a line too long for
        --max-length is quoted by its last words, "...words").
Speeches wholly inside the first 90% of the text (the pre-training train split, same cut as `megagpt prep
shakespeare`) give the train conversations, those wholly inside the last 10% the val ones: held-out questions
about text the model never trained on. Lines spoken by more than one speaker, and lines under 8 characters,
give no "who" question (no single right answer). A question is kept only when the whole conversation fits
--max-length tokens (default 65: block_size 64 of the README's CPU model, plus one).

The output dir is a `chat` dataset (data_prep/chat.py; the char tokenizer is byte-identical to the pre-training
dataset's, so the CPU model fine-tunes on it) plus questions-train.jsonl and questions-val.jsonl: the same
conversations with their "kind" and "answer", which `megagpt eval qa` reads.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from data_prep.chat import ChatPrepSettings, prepare_chat
from data_prep.shakespeare import check_embedded, embedded_copy
from megagpt.errors import UserError
from megagpt.eval_qa import QUESTION_FILES as QUESTIONS
from megagpt.tokenizer import CharTokenizer

TRAIN_FRACTION = 0.9  # as `megagpt prep shakespeare`: the first 90% of the characters are the train split
MIN_LINE_CHARS = 8
MIN_TAIL_CHARS = 12  # a "next" question quotes at least this much of the line's end
WHO, NEXT = "Who says: ", "What follows: "


def play_text() -> str:
    copy = embedded_copy()
    check_embedded(copy)
    return gzip.decompress(copy.read_bytes()).decode("utf-8")


def speeches(text: str, start: int, end: int) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech wholly inside text[start:end]."""
    out, offset = [], 0
    for block in text.split("\n\n"):
        lo, hi = offset, offset + len(block)
        offset = hi + 2
        lines = block.strip("\n").split("\n")
        if lo >= start and hi <= end and len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0][:-1], lines[1:]))
    return out


def _tail(line: str, budget: int) -> str | None:
    """The line, or its last words ("...words") when it does not fit budget characters; None under 12."""
    if len(line) <= budget:
        return line
    words = line.split(" ")
    while words and len(" ".join(words)) + 3 > budget:
        words.pop(0)
    tail = "..." + " ".join(words)
    return tail if len(tail) >= MIN_TAIL_CHARS and words else None


def _conversation(question: str, answer: str, kind: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "kind": kind, "answer": answer}


def questions(text: str, max_length: int) -> dict[str, list[dict]]:
    """The train and val questions; char level, so a conversation's length is its characters plus 4 tokens."""
    cut = int(len(text) * TRAIN_FRACTION)
    splits = {"train": speeches(text, 0, cut), "val": speeches(text, cut, len(text))}
    speakers_of = defaultdict(set)
    for speaker, lines in splits["train"] + splits["val"]:
        for line in lines:
            speakers_of[line].add(speaker)
    out = {}
    for split, items in splits.items():
        found = []
        for speaker, lines in items:
            for i, line in enumerate(lines):
                if len(line) >= MIN_LINE_CHARS and len(speakers_of[line]) == 1 and \
                        len(WHO) + len(line) + len(speaker) + 4 <= max_length:
                    found.append(_conversation(WHO + line, speaker, "who"))
                quoted = _tail(line, max_length - len(NEXT) - len(lines[i + 1]) - 4) if i + 1 < len(lines) else None
                if quoted:
                    found.append(_conversation(NEXT + quoted, lines[i + 1], "next"))
        out[split] = found
    return out


def prepare_shakespeare_qa(out_dir: str | Path, max_length: int = 65, force: bool = False):
    """The chat dataset and the question files in out_dir; (out_dir, the chat prep summary)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"--out {out_dir}: already exists; pass --force to replace it")
    if max_length < 16:
        raise UserError(f"--max-length {max_length}: too short for any question (at least 16)")
    text = play_text()
    found = questions(text, max_length)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.questions-", dir=out_dir.parent))
    try:
        for split, name in QUESTIONS.items():
            (work / name).write_text("".join(json.dumps(q) + "\n" for q in found[split]))
        tokenizer = CharTokenizer(sorted(set(text)), None)  # what `megagpt prep shakespeare` writes
        tokenizer.save(work / "tokenizer.json")
        settings = ChatPrepSettings(max_length=max_length)
        out, summary = prepare_chat([work / QUESTIONS["train"]], out_dir, None, settings,
                                    val_inputs=[work / QUESTIONS["val"]], force=force,
                                    extra_settings={"source": "shakespeare-qa",
                                                    "tokenizer_from": "the embedded Tiny Shakespeare, char level"},
                                    base=(tokenizer, work / "tokenizer.json"))
        for name in QUESTIONS.values():
            shutil.move(work / name, out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, summary


def add_parser(sub) -> None:
    p = sub.add_parser("shakespeare-qa", help="question/answer conversations about Tiny Shakespeare (for sft)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset dir to create")
    p.add_argument("--max-length", type=int, default=65,
                   help="tokens per conversation: the model's block_size + 1 (65 for the CPU model)")
    p.add_argument("--force", action="store_true", help="replace --out when it already exists")
    p.set_defaults(run=run)


def run(args) -> Path:
    out, summary = prepare_shakespeare_qa(args.out, args.max_length, args.force)
    print(f"megagpt prep shakespeare-qa: {summary.line()}")
    return out
