"""`megagpt prep shakespeare-qa`: question/answer conversations about Tiny Shakespeare, from the play's structure.

The text is a sequence of speeches, "SPEAKER:" on a line and the speech's lines under it, separated by blank
lines. Two kinds of questions come out of it:
  who:  "Who says: <a line>"      -> the speaker ("PETRUCHIO"): a short answer, scored by exact match;
  next: "What follows: <a line>"  -> the next line of the same speech: a free-text answer (a line too long for
        --max-length is quoted by its last words, "...words").
Which speeches give the held-out (val) questions, --holdout:
  speeches (default): a deterministic ~10% of the speeches of the first 90% of the text (the pre-training train
        split, same cut as `megagpt prep shakespeare`), chosen by a hash of the speech's position; the other
        speeches there give the train questions. Every play has held-out speeches, and both the base and the
        fine-tuned model read the held-out text in pre-training: the comparison asks whether fine-tuning makes
        what pre-training learnt answerable. The last 10% of the text gives no question (no stage sees it).
  tail: the speeches wholly inside the first 90% give the train questions, those wholly inside the last 10%
        (the end of The Taming of the Shrew, The Tempest) the val ones: text no model trained on, whose
        speakers mostly occur in no train question, so no model can name them.
A val question never quotes or answers a line that also occurs in a train speech, nor is it asked in train.
Lines spoken by more than one speaker, and lines under 8 characters, give no "who" question (no single right
answer). A question is kept only when the whole conversation fits --max-length tokens (default 65: block_size
64 of the README's CPU model, plus one).

The output dir is a `chat` dataset (data_prep/chat.py; the char tokenizer is byte-identical to the pre-training
dataset's, so the CPU model fine-tunes on it) plus questions-train.jsonl and questions-val.jsonl: the same
conversations with their "kind" and "answer", which `megagpt eval qa` reads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from data_prep.chat import ChatPrepSettings, prepare_chat
from data_prep.out_dir import work_dir_for
from data_prep.shakespeare import check_embedded, embedded_copy
from megagpt.errors import UserError
from megagpt.eval_qa import QUESTION_FILES as QUESTIONS
from megagpt.tokenizer import CharTokenizer

TRAIN_FRACTION = 0.9  # as `megagpt prep shakespeare`: the first 90% of the characters are the train split
HELD_OUT_FRACTION = 0.1  # of the speeches, with --holdout speeches
HOLDOUTS = ("speeches", "tail")
MIN_LINE_CHARS = 8
MIN_TAIL_CHARS = 12  # a "next" question quotes at least this much of the line's end
WHO, NEXT = "Who says: ", "What follows: "


def play_text() -> str:
    copy = embedded_copy()
    check_embedded(copy)
    return gzip.decompress(copy.read_bytes()).decode("utf-8")


def speeches(text: str) -> list[tuple[int, int, str, list[str]]]:
    """(start, end, speaker, lines) of every speech of the text, in order."""
    out, offset = [], 0
    for block in text.split("\n\n"):
        lo, hi = offset, offset + len(block)
        offset = hi + 2
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lo, hi, lines[0][:-1], lines[1:]))
    return out


def held_out(position: int) -> bool:
    """Whether the text's position-th speech is a held-out one: ~HELD_OUT_FRACTION of them, by a hash of the
    position (not every k-th speech: in a dialogue of two speakers that would always pick the same one)."""
    digest = hashlib.sha256(f"speech {position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELD_OUT_FRACTION * 2 ** 64


def split_speeches(text: str, holdout: str) -> dict[str, list[tuple[str, list[str]]]]:
    """(speaker, lines) of the train and the val speeches (see --holdout in the module's docstring)."""
    cut = int(len(text) * TRAIN_FRACTION)
    found = speeches(text)
    if holdout == "tail":
        return {"train": [(who, lines) for lo, hi, who, lines in found if hi <= cut],
                "val": [(who, lines) for lo, hi, who, lines in found if lo >= cut]}
    seen = [(i, who, lines) for i, (lo, hi, who, lines) in enumerate(found) if hi <= cut]
    return {"train": [(who, lines) for i, who, lines in seen if not held_out(i)],
            "val": [(who, lines) for i, who, lines in seen if held_out(i)]}


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


def questions(text: str, max_length: int, holdout: str = "speeches") -> dict[str, list[dict]]:
    """The train and val questions; char level, so a conversation's length is its characters plus 4 tokens."""
    splits = split_speeches(text, holdout)
    speakers_of = defaultdict(set)
    for speaker, lines in splits["train"] + splits["val"]:
        for line in lines:
            speakers_of[line].add(speaker)
    train_lines = {line for _, lines in splits["train"] for line in lines}
    out = {}
    for split, items in splits.items():
        found = []
        for speaker, lines in items:
            for i, line in enumerate(lines):
                if split == "val" and line in train_lines:
                    continue  # a held-out question quotes no line of the train questions' speeches
                if len(line) >= MIN_LINE_CHARS and len(speakers_of[line]) == 1 and \
                        len(WHO) + len(line) + len(speaker) + 4 <= max_length:
                    found.append(_conversation(WHO + line, speaker, "who"))
                following = lines[i + 1] if i + 1 < len(lines) else None
                if following is None or (split == "val" and following in train_lines):
                    continue
                quoted = _tail(line, max_length - len(NEXT) - len(following) - 4)
                if quoted:
                    found.append(_conversation(NEXT + quoted, following, "next"))
        out[split] = found
    asked = {q["messages"][0]["content"] for q in out["train"]}  # a short quoted tail may recur ("...the world,")
    out["val"] = [q for q in out["val"] if q["messages"][0]["content"] not in asked]
    return out


def prepare_shakespeare_qa(out_dir: str | Path, max_length: int = 65, force: bool = False,
                           holdout: str = "speeches"):
    """The chat dataset and the question files in out_dir; (out_dir, the chat prep summary)."""
    out_dir = Path(out_dir)
    work_dir_for(out_dir, force)  # checked before the questions are made
    if max_length < 16:
        raise UserError(f"--max-length {max_length}: too short for any question (at least 16)")
    if holdout not in HOLDOUTS:
        raise UserError(f"--holdout {holdout}: not one of {', '.join(HOLDOUTS)}")
    text = play_text()
    found = questions(text, max_length, holdout)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.questions-", dir=out_dir.parent))
    try:
        for split, name in QUESTIONS.items():
            (work / name).write_text("".join(json.dumps(q) + "\n" for q in found[split]))
        tokenizer = CharTokenizer(sorted(set(text)), None)  # what `megagpt prep shakespeare` writes
        tokenizer.save(work / "tokenizer.json")
        settings = ChatPrepSettings(max_length=max_length)
        out, summary = prepare_chat([work / QUESTIONS["train"]], out_dir, None, settings,
                                    val_inputs=[work / QUESTIONS["val"]], force=force,
                                    extra_settings={"source": "shakespeare-qa", "holdout": holdout,
                                                    "tokenizer_from": "the embedded Tiny Shakespeare, char level"},
                                    base=(tokenizer, work / "tokenizer.json"),
                                    extra_files=[work / name for name in QUESTIONS.values()])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, summary


def add_parser(sub) -> None:
    p = sub.add_parser("shakespeare-qa", help="question/answer conversations about Tiny Shakespeare (for sft)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset dir to create")
    p.add_argument("--max-length", type=int, default=65,
                   help="tokens per conversation: the model's block_size + 1 (65 for the CPU model)")
    p.add_argument("--holdout", choices=HOLDOUTS, default="speeches",
                   help="the val questions: speeches = ~10%% of the speeches of every play (text both models "
                        "pre-trained on); tail = the last 10%% of the text (plays no model saw)")
    p.add_argument("--force", action="store_true", help="replace --out when it already exists")
    p.set_defaults(run=run)


def run(args) -> Path:
    out, summary = prepare_shakespeare_qa(args.out, args.max_length, args.force, args.holdout)
    print(f"megagpt prep shakespeare-qa: {summary.line()}")
    return out
