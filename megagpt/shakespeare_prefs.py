"""`megagpt prep shakespeare-prefs`: preference pairs for the demo, sampled from an SFT model and labelled by the
real-word rule (megagpt/realwords.py), written as a `preferences` dataset.

For each free-text question ("What follows: ...") of the Shakespeare QA data's train split (`megagpt prep
shakespeare-qa`), the SFT model samples --samples replies (temperature --temperature, the full distribution,
one seeded generator per reply, --batch questions at a time); the reply with the highest real-word rate is
`chosen`, the one with the lowest `rejected`, and a question whose best and worst differ by less than
--min-margin gives no pair. The output
dir is a preferences dataset (val pairs: a seeded --val-fraction of them) plus
  words.txt           the vocabulary of Tiny Shakespeare's training text (the rule's; `megagpt eval prefs` reads it)
  prompts-val.jsonl   the QA val split's free-text questions as {"messages": [...]}: held-out prompts about text no
                      model trained on (`megagpt eval prefs` asks them)
  pairs.jsonl         the labelled pairs with both scores, as sampled (train and val together)
The dataset is written by data_prep (megagpt/cli.py hands `prepare` in: only the CLI layer imports data_prep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from megagpt.chat_template import END, chat_token_ids, check_messages, prompt_ids, require_chat_tokens
from megagpt.errors import UserError, check_seed
from megagpt.eval_prefs import VAL_PROMPTS
from megagpt.eval_qa import load_questions, questions_for
from megagpt.generate import generate_replies
from megagpt.realwords import WORDS_FILE, real_word_rate, save_vocabulary, vocabulary

PAIRS = "pairs.jsonl"
# Why a question gives no pair, in the summary's order.
MARGIN, NO_ROOM, SAME = "below --min-margin", "with no room for a reply in block_size", "with identical replies"


def free_text_prompts(data_dir: str | Path, split: str) -> list[list[dict]]:
    """The messages (one user turn) of a QA split's free-text ("next") questions."""
    return [q["messages"][:1] for q in load_questions(data_dir, split, "--qa") if q["kind"] == "next"]


def sample_seed(seed: int, question: int, sample: int) -> int:
    """The seed of one reply's generator: a reply depends on (model, question, seed) only, not on the batch."""
    return int(np.random.SeedSequence([seed, question, sample]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_replies(model, tokenizer, questions: list[tuple[int, list[dict]]], samples: int, max_new_tokens: int,
                   temperature: float, seed: int) -> list[list[str]]:
    """`samples` replies to each (index, messages) question, all in one batch, each cut at its end-of-turn token
    (none for a question that leaves no room in block_size)."""
    end = require_chat_tokens(tokenizer)[END]
    device = next(model.parameters()).device
    block = model.cfg.block_size
    ids = [prompt_ids(tokenizer, check_messages(messages, final_role="user")) for _, messages in questions]
    rows = [(q, k) for q, p in enumerate(ids) if len(p) < block for k in range(samples)]
    replies: list[list[str]] = [[] for _ in questions]
    if not rows:
        return replies
    generators = [torch.Generator(device=device).manual_seed(sample_seed(seed, questions[q][0], k)) for q, k in rows]
    caps = [min(max_new_tokens, block - len(ids[q])) for q, _ in rows]
    out = generate_replies(model, [ids[q] for q, _ in rows], caps, end, generators, temperature=temperature)
    for (q, _), (reply, stopped) in zip(rows, out, strict=True):
        replies[q].append(tokenizer.decode(reply[:-1] if stopped else reply))
    return replies


def label(replies: list[str], known: set[str], min_margin: float) -> tuple[str, str, float, float] | str:
    """(chosen, rejected, their scores): the replies with the highest and lowest real-word rate; else why there is
    no pair: MARGIN when they differ by less than min_margin, SAME when they are one text (min_margin <= 0)."""
    scores = [real_word_rate(r, known) for r in replies]
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] - scores[worst] < min_margin:
        return MARGIN
    if replies[best] == replies[worst]:
        return SAME
    return replies[best], replies[worst], scores[best], scores[worst]


def make_pairs(model, tokenizer, prompts: list[list[dict]], known: set[str], args) -> tuple[list[dict], dict]:
    """The labelled pairs, and how many questions gave none for each reason (MARGIN, NO_ROOM, SAME)."""
    from tqdm import tqdm

    pairs, dropped = [], dict.fromkeys((MARGIN, NO_ROOM, SAME), 0)
    for first in tqdm(range(0, len(prompts), args.batch), desc="shakespeare-prefs", unit="batch", disable=None):
        questions = list(enumerate(prompts[first:first + args.batch], start=first))
        replies = sample_replies(model, tokenizer, questions, args.samples, args.max_new_tokens, args.temperature,
                                 args.seed)
        for (_, messages), answers in zip(questions, replies, strict=True):
            labelled = label(answers, known, args.min_margin) if len(answers) >= 2 else NO_ROOM
            if isinstance(labelled, str):
                dropped[labelled] += 1
                continue
            chosen, rejected, good, bad = labelled
            pairs.append({"prompt": messages, "chosen": chosen, "rejected": rejected, "scores": [good, bad]})
    return pairs, dropped


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt prep shakespeare-prefs", description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="the SFT model: a run dir (or export dir) of train.stage: sft")
    p.add_argument("--qa", required=True, help="the dir `megagpt prep shakespeare-qa` wrote (its questions)")
    p.add_argument("--out", required=True, help="the preferences dataset dir to create")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions (a seeded subset)")
    p.add_argument("--samples", type=int, default=4, help="replies sampled per question (>= 2)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64, help="also capped by the model's block_size")
    p.add_argument("--min-margin", type=float, default=0.1, help="least real-word-rate gap for a pair")
    p.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out for the reward model's val")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--batch", type=int, default=16, help="questions sampled together (the same replies at any "
                   "batch size, up to float rounding)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a small model samples fastest on one)")
    p.add_argument("--force", action="store_true", help="replace --out when it already exists")
    return p


def main(argv: list[str], training_text, prepare, check_out) -> int:
    """`training_text()` -> Tiny Shakespeare's training text; `check_out(out, force)` refuses an --out the dataset
    may not replace, before any sampling; `prepare(jsonl, out, tokenizer_dir, val_fraction, seed, force,
    extra_settings, extra_files)` writes the preferences dataset with the extra files inside
    (data_prep/preferences.py)."""
    from megagpt.inference import load_for_inference

    args = parser().parse_args(argv)
    if args.samples < 2 or args.max_new_tokens < 1 or args.batch < 1 or args.temperature <= 0 or args.limit == 0:
        raise UserError("--samples must be at least 2, --max-new-tokens, --batch and --limit at least 1, "
                        "--temperature above 0")
    check_seed(args.seed)
    out = Path(args.out)
    check_out(out, args.force)
    prompts = free_text_prompts(args.qa, "train")
    if args.limit is not None:
        keep = sorted(np.random.default_rng(args.seed).permutation(len(prompts))[:args.limit].tolist())
        prompts = [prompts[i] for i in keep]
    val_prompts = free_text_prompts(args.qa, "val")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_for_inference(args.sft, device=args.device)
    if chat_token_ids(tokenizer) is None:
        raise UserError(f"--sft {args.sft}: not a fine-tuned model (its tokenizer has no chat tokens); pass a run "
                        f"of train.stage: sft")
    known = vocabulary(training_text())
    with questions_for(f"--sft {args.sft}", "--qa"):
        pairs, dropped = make_pairs(model, tokenizer, prompts, known, args)
    if len(pairs) < 2:
        raise UserError(f"--sft {args.sft}: only {len(pairs)} of {len(prompts)} questions gave replies whose "
                        f"real-word rates differ by --min-margin {args.min_margin}; lower it or sample more")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.pairs-", dir=out.parent))
    try:  # the pairs, the rule's vocabulary and the held-out prompts go inside the dataset dir, put in place whole
        (work / PAIRS).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        save_vocabulary(known, work / WORDS_FILE)
        (work / VAL_PROMPTS).write_text("".join(json.dumps({"messages": m}) + "\n" for m in val_prompts))
        settings = {k: getattr(args, k) for k in ("samples", "temperature", "max_new_tokens", "min_margin",
                                                  "limit", "seed")}
        _, summary = prepare(work / PAIRS, out, args.sft, args.val_fraction, args.seed, args.force,
                             {"source": "shakespeare-prefs", "sft": str(args.sft), "qa": str(args.qa), **settings},
                             [work / name for name in (PAIRS, WORDS_FILE, VAL_PROMPTS)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"megagpt prep shakespeare-prefs: {summary_line(len(prompts), pairs, dropped, summary)}")
    print(f"wrote {out}")
    return 0


def summary_line(questions: int, pairs: list[dict], dropped: dict[str, int], summary) -> str:
    """Every question once: a pair in the dataset, or dropped for one reason (here, or by the dataset's writer)."""
    dropped = {**dropped, SAME: dropped[SAME] + summary.identical}
    if summary.too_long:  # the dataset writer's reason; this command passes it no --max-length
        dropped["longer than --max-length"] = summary.too_long
    reasons = ", ".join(f"{n} {why}" for why, n in dropped.items())
    written, rates = summary.pairs, np.array([p["scores"] for p in pairs])
    chars = f"; {summary.dropped_chars} unknown characters dropped" if summary.dropped_chars else ""
    return (f"{questions} questions -> {written['train'] + written['val']} pairs (train {written['train']}, val "
            f"{written['val']}), {summary.tokens} tokens; dropped: {reasons}; mean real-word rate chosen "
            f"{rates[:, 0].mean():.3f}, rejected {rates[:, 1].mean():.3f}{chars}")
