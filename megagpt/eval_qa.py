"""`megagpt eval qa`: a fine-tuned model against its base model on held-out Shakespeare questions.

Reads the val questions that `megagpt prep shakespeare-qa` wrote (by default about speeches held out from every
play, text that both models read in pre-training; with its `--holdout tail`, about the last 10% of the text,
which neither model read) and reports, decoding greedily unless it says otherwise:
  * the fine-tuned model (chat template): the stop rate (replies that end with the end-of-turn token within
    --max-new-tokens), exact-match accuracy of the speaker answers ("who"), and of the next lines ("next");
    and, decoded as the base model's ranking is, the speaker accuracy of ranking the same candidates as its
    whole reply (name, end-of-turn);
  * the base model, the fair baselines for a document completer:
      - few-shot generation: k solved train questions as plain text ("Who says: ...\\nSPEAKER\\n\\n"), then the
        question; the reply is what it writes up to the newline (its stop); k in 0..3, the best on 100 train
        questions (a base model with a short block_size only sees the last block_size tokens of the prompt);
      - ranking in the play's own format: each of the --candidates most frequent train speakers heads the line
        as a speech ("\\nSPEAKER:\\n<line>\\n"), and the speaker under which the base model finds the line
        likeliest is its answer;
  * both rankings' ceiling: the share of answers among the candidates;
  * chance: uniform over the speakers of the held-out questions, and always the most frequent train speaker.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megagpt.chat import generate_reply
from megagpt.chat_template import END, chat_token_ids, check_messages, prompt_ids
from megagpt.errors import UserError, check_seed
from megagpt.files import write_whole

QUESTION_FILES = {"train": "questions-train.jsonl", "val": "questions-val.jsonl"}  # data_prep/shakespeare_qa.py
SHOTS = (0, 1, 2, 3)


@contextmanager
def questions_for(path, option: str = "--data"):
    """A question the model's char tokenizer cannot write is a one-line error naming the model (`option`'s dir
    holds another text's questions)."""
    try:
        yield
    except ValueError as e:  # a character outside a char vocabulary
        raise UserError(f"{path}: a question of {option} does not fit its tokenizer: {e}") from None


def load_questions(data_dir: str | Path, split: str, option: str = "--data") -> list[dict]:
    """The questions of a split of the dir `prep shakespeare-qa` wrote, named by the command's `option`."""
    path = Path(data_dir) / QUESTION_FILES[split]
    if not path.is_file():
        raise UserError(f"{option} {data_dir}: no {QUESTION_FILES[split]}; prepare it with "
                        f"`megagpt prep shakespeare-qa --out {data_dir}`")
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            found.append(_question(line, f"{option} {data_dir}: {QUESTION_FILES[split]}:{number}"))
    return found


def _question(line: str, where: str) -> dict:
    """One line of a questions file: a JSON object with a kind, the question's messages and its answer."""
    try:
        question = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(question, dict) or not {"kind", "messages", "answer"} <= question.keys():
        raise UserError(f"{where}: not a question (a JSON object with kind, messages and answer)")
    return question


def _progress(questions: list[dict], desc: str):
    """The questions, with a progress bar on a terminal (a full evaluation takes minutes on a CPU)."""
    from tqdm import tqdm

    return tqdm(questions, desc=desc, unit="question", disable=None, leave=False)


def subset(questions: list[dict], kind: str, limit: int, seed: int) -> list[dict]:
    """At most `limit` questions of a kind, drawn at random (seeded), in file order."""
    found = [q for q in questions if q["kind"] == kind]
    keep = sorted(np.random.default_rng(seed).permutation(len(found))[:limit].tolist())
    return [found[i] for i in keep]


# ---------------------------------------------------------------- the fine-tuned model


def ask_chat_model(model, tokenizer, questions: list[dict], max_new_tokens: int) -> list[tuple[str, bool]]:
    """(reply, stopped at end-of-turn) per question, greedy."""
    special = chat_token_ids(tokenizer)
    out = []
    for q in _progress(questions, "fine-tuned, greedy"):
        ids = prompt_ids(tokenizer, check_messages(q["messages"][:1], final_role="user"))
        reply = generate_reply(model, ids, special[END], max_new_tokens, temperature=0.0)
        out.append((tokenizer.decode(reply.ids), reply.stopped))
    return out


def rank_chat_answers(model, tokenizer, questions: list[dict], candidates: list[str]) -> list[str]:
    """Per "who" question, the candidate the fine-tuned model finds likeliest as its whole reply (name, <|end|>)."""
    end = chat_token_ids(tokenizer)[END]
    out = []
    for q in _progress(questions, "fine-tuned, ranking"):
        prompt = prompt_ids(tokenizer, check_messages(q["messages"][:1], final_role="user"))
        out.append(candidates[likeliest(model, [(prompt, [*tokenizer.encode(s), end]) for s in candidates])])
    return out


# ---------------------------------------------------------------- the base model


def few_shot_prompt(examples: list[dict], question: dict) -> str:
    shots = "".join(f"{q['messages'][0]['content']}\n{q['answer']}\n\n" for q in examples)
    return f"\n{shots}{question['messages'][0]['content']}\n"


def ask_completer(model, tokenizer, questions: list[dict], examples: list[dict],
                  max_new_tokens: int) -> list[tuple[str, bool]]:
    """(text up to the first newline, a newline came within max_new_tokens) per question, greedy."""
    newline = tokenizer.encode("\n")[-1]
    out = []
    for q in _progress(questions, f"base, {len(examples)}-shot"):
        ids = tokenizer.encode(few_shot_prompt(examples, q))
        reply = generate_reply(model, ids, newline, max_new_tokens, temperature=0.0)
        out.append((tokenizer.decode(reply.ids), reply.stopped))
    return out


def rank_speakers(model, tokenizer, questions: list[dict], candidates: list[str]) -> list[str]:
    """Per "who" question, the candidate under whose heading ("\\nSPEAKER:\\n<line>\\n") the line is likeliest."""
    return [candidates[likeliest(model, [([], tokenizer.encode(f"\n{s}:\n{_line(q)}\n")) for s in candidates])]
            for q in _progress(questions, "base, ranking")]


# ---------------------------------------------------------------- ranking, for both models


def _line(question: dict) -> str:
    return question["messages"][0]["content"].removeprefix("Who says: ")


@torch.no_grad()
def likeliest(model, rows: list[tuple[list[int], list[int]]]) -> int:
    """The index of the (prefix, continuation) row whose continuation the model finds likeliest after its prefix
    (the sum of its tokens' log-probabilities; a row is cut to its last block_size + 1 tokens, and a row's first
    token, having no context, is never scored)."""
    block = model.cfg.block_size
    cut = [(prefix + cont)[-(block + 1):] for prefix, cont in rows]
    width = max(map(len, cut))
    ids = torch.zeros(len(cut), width, dtype=torch.long)
    for i, row in enumerate(cut):
        ids[i, :len(row)] = torch.tensor(row)
    logits, _ = model(ids[:, :-1])
    logp = -F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (rows, width-1)
    target = torch.arange(1, width)[None, :]  # the position each log-probability scores
    ends = torch.tensor([len(row) for row in cut])[:, None]
    scored = [min(len(cont), len(row) - 1) for (_, cont), row in zip(rows, cut, strict=True)]
    starts = ends - torch.tensor(scored)[:, None]
    return int((logp * ((target >= starts) & (target < ends))).sum(dim=1).argmax())


# ---------------------------------------------------------------- scoring and the report


def exact(replies: list[tuple[str, bool]], questions: list[dict]) -> float:
    hits = sum(reply.strip() == q["answer"].strip() for (reply, _), q in zip(replies, questions, strict=True))
    return hits / max(len(questions), 1)


def stop_rate(replies: list[tuple[str, bool]]) -> float:
    return sum(stopped for _, stopped in replies) / max(len(replies), 1)


def evaluate(run_dir, data_dir, base=None, limit: int = 400, max_new_tokens: int = 48, candidates: int = 40,
             seed: int = 0, device: str = "cpu", step: int | None = None) -> dict:
    """Every number of the report, as a dict."""
    from megagpt.inference import load_for_inference
    from megagpt.init_from import parse_spec

    val, train = load_questions(data_dir, "val"), load_questions(data_dir, "train")
    who, following = subset(val, "who", limit, seed), subset(val, "next", limit, seed)
    train_who = Counter(q["answer"] for q in train if q["kind"] == "who")
    for split, found in (("val", who), ("train", train_who)):
        if not found:
            raise UserError(f"--data {data_dir}: its {QUESTION_FILES[split]} has no speaker (\"who\") questions; "
                            f"prepare it with `megagpt prep shakespeare-qa`")
    model, tokenizer, cfg = load_for_inference(run_dir, step, device)
    if chat_token_ids(tokenizer) is None:
        raise UserError(f"{run_dir}: not a fine-tuned model (its tokenizer has no chat tokens); pass a run of "
                        f"`train.stage: sft`")
    most_common = train_who.most_common(1)[0][0]
    speakers = [s for s, _ in train_who.most_common(candidates)]
    with questions_for(run_dir):
        replies_who = ask_chat_model(model, tokenizer, who, max_new_tokens)
        replies_next = ask_chat_model(model, tokenizer, following, max_new_tokens)
        ranked = rank_chat_answers(model, tokenizer, who, speakers)
    report = {"run_dir": str(run_dir), "holdout": holdout(data_dir),
              "questions": {"who": len(who), "next": len(following)},
              "finetuned": {"stop_rate": stop_rate(replies_who + replies_next), "speaker_accuracy":
                            exact(replies_who, who), "next_line_accuracy": exact(replies_next, following),
                            "ranking_speaker_accuracy": hit_rate(ranked, who)},
              "ranking": {"candidates": len(speakers),
                          "coverage": sum(q["answer"] in speakers for q in who) / len(who)},
              "chance": {"uniform": 1 / len({q["answer"] for q in who}),
                         "most_frequent_train_speaker": most_common,
                         "always_most_frequent": hit_rate([most_common] * len(who), who)}}
    base = base or cfg.train.init_from
    if base:
        path, base_step = parse_spec(str(base))
        report["base"] = evaluate_base(path, base_step, device, train, who, max_new_tokens, speakers, seed)
    report["examples"] = [{"question": q["messages"][0]["content"], "answer": q["answer"], "reply": r}
                          for q, (r, _) in list(zip(who, replies_who, strict=True))[:3]
                          + list(zip(following, replies_next, strict=True))[:3]]
    return report


def hit_rate(answers: list[str], questions: list[dict]) -> float:
    """The share of questions whose answer is the one given (exact match)."""
    return sum(a == q["answer"] for a, q in zip(answers, questions, strict=True)) / len(questions)


def evaluate_base(path: Path, step: int | None, device: str, train: list[dict], who: list[dict],
                  max_new_tokens: int, candidates: list[str], seed: int) -> dict:
    from megagpt.inference import load_for_inference

    model, tokenizer, _ = load_for_inference(path, step, device)
    train_who = subset(train, "who", 100 + max(SHOTS), seed)
    examples, dev = train_who[:max(SHOTS)], train_who[max(SHOTS):]
    with questions_for(path):
        by_shots = {k: exact(ask_completer(model, tokenizer, dev, examples[:k], max_new_tokens), dev) for k in SHOTS}
        best = max(SHOTS, key=lambda k: (by_shots[k], -k))
        replies = ask_completer(model, tokenizer, who, examples[:best], max_new_tokens)
        ranked = rank_speakers(model, tokenizer, who, candidates)
    return {"path": str(path), "few_shot_k": best, "few_shot_dev_accuracy": by_shots,
            "few_shot_stop_rate": stop_rate(replies), "few_shot_speaker_accuracy": exact(replies, who),
            "ranking_speaker_accuracy": hit_rate(ranked, who)}


def holdout(data_dir: str | Path) -> str:
    """How the questions' val split was held out (`prep shakespeare-qa --holdout`; "tail" before it existed)."""
    from megagpt.dataset import load_manifest

    return load_manifest(data_dir).settings.get("holdout", "tail")


def format_report(r: dict) -> str:
    f, c, n = r["finetuned"], r["chance"], r["questions"]
    lines = [f"held-out questions ({r['holdout']}): {n['who']} who (speaker), {n['next']} next (following line)",
             f"fine-tuned {r['run_dir']}:",
             f"  stop rate (end-of-turn within --max-new-tokens)  {f['stop_rate']:.1%}",
             f"  speaker exact match                              {f['speaker_accuracy']:.1%}",
             f"  next line exact match                            {f['next_line_accuracy']:.1%}"]
    k = r["ranking"]
    lines += [f"  ranking the {k['candidates']} most frequent train speakers as its reply: speaker accuracy "
              f"{f['ranking_speaker_accuracy']:.1%}"]
    if "base" in r:
        b = r["base"]
        lines += [f"base {b['path']}:",
                  f"  few-shot generation (k={b['few_shot_k']}): stop rate {b['few_shot_stop_rate']:.1%}, "
                  f"speaker exact match {b['few_shot_speaker_accuracy']:.1%}",
                  f"  ranking the same {k['candidates']} speakers in the play's format: speaker accuracy "
                  f"{b['ranking_speaker_accuracy']:.1%}"]
    lines += [f"rankings' ceiling: the answer is among the {k['candidates']} candidates for {k['coverage']:.1%}"]
    lines += [f"chance: uniform over the {round(1 / c['uniform'])} speakers {c['uniform']:.1%}; always "
              f"{c['most_frequent_train_speaker']} (the most frequent train speaker) {c['always_most_frequent']:.1%}"]
    lines += [f"  e.g. {e['question']!r} -> {e['reply']!r} (answer {e['answer']!r})" for e in r["examples"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megagpt eval qa", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="RUN_DIR or EXPORT_DIR of the fine-tuned model")
    p.add_argument("--data", required=True, help="the dir `megagpt prep shakespeare-qa` wrote")
    p.add_argument("--base", help="the base model (default: the run's train.init_from)")
    p.add_argument("--limit", type=int, default=400, help="held-out questions per kind (a seeded random subset)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--candidates", type=int, default=40, help="speakers the base model's ranking chooses from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step of the run dir (default: latest)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.limit < 1 or args.max_new_tokens < 1 or args.candidates < 1:
        raise UserError("--limit, --max-new-tokens and --candidates must be at least 1")
    check_seed(args.seed)
    from megagpt.sample import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    report = evaluate(args.run_dir, args.data, args.base, args.limit, args.max_new_tokens, args.candidates,
                      args.seed, device, args.step)
    print(format_report(report))
    if args.json:
        write_whole(args.json, json.dumps(report, indent=1) + "\n")
    sys.stdout.flush()
    return 0
