"""`megagpt eval prefs`: models side by side on held-out prompts, by the demo's real-word rule, a reward model's
score and the KL to the SFT model.

Every run (or export) answers the same held-out prompts (`prompts-val.jsonl` of the dir `megagpt prep
shakespeare-prefs` wrote: the QA data's val split, text no model trained on) with replies sampled as in PPO's
rollouts (--temperature, the full distribution, the same seed per prompt for every run), and is reported with:
  real_word_rate       the mean over replies of the fraction of their words found in Tiny Shakespeare's
                       training text (megagpt/realwords.py; `words.txt` of the same dir)
  reward_model_score   the mean score --reward-model gives the replies (when given)
  kl_to_reference      the mean over replies of Σ_t log π(y_t) - log π_ref(y_t), a sampled estimate of
                       KL(π || π_ref) per reply, π_ref the SFT model (--reference, default the reference of the
                       first dpo or ppo run given)
  response_length, stop_rate
FILE.json holds the table ("runs") and every sample ("samples": {"run", "prompt", "reply", ...} records).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from megagpt.align_objectives import token_logprobs
from megagpt.chat_template import END, check_messages, prompt_ids, require_chat_tokens
from megagpt.errors import UserError, check_seed
from megagpt.files import write_whole
from megagpt.preference_data import completion_rows
from megagpt.realwords import WORDS_FILE, load_vocabulary, real_word_rate
from megagpt.reward_model import read_scores
from megagpt.rollout import action_mask, prompt_seed, sample_replies

VAL_PROMPTS = "prompts-val.jsonl"  # megagpt/shakespeare_prefs.py writes it


def find_data_dir(runs: list[Path]) -> Path:
    """The first run's data.dataset_dir that holds the word list and the held-out prompts."""
    from megagpt.config import load_config

    for run in runs:
        if (run / "config.yaml").is_file():
            folder = Path(load_config(run / "config.yaml").data.dataset_dir)
            if (folder / WORDS_FILE).is_file() and (folder / VAL_PROMPTS).is_file():
                return folder
    raise UserError(f"none of the runs' data.dataset_dir holds {WORDS_FILE} and {VAL_PROMPTS}; pass --data, the "
                    f"dir `megagpt prep shakespeare-prefs` wrote")


def find_reference(runs: list[Path]) -> str | None:
    from megagpt.config import load_config

    for run in runs:
        if (run / "config.yaml").is_file():
            cfg = load_config(run / "config.yaml")
            if cfg.train.stage in ("dpo", "ppo"):
                return cfg.align.reference or cfg.train.init_from
    return None


def check_tokenizers(runs: list[Path], judges: list[tuple[str, str]]) -> None:
    """The reward model and the reference (judges: (spec, option)) score the runs' token ids: each must carry the
    tokenizer of every run (its file byte-identical), else its scores and the KL would be of other text."""
    from megagpt.dataset import sha256_file
    from megagpt.init_from import open_source

    def tokenizer(spec, option: str) -> tuple[Path | None, str | None]:
        file = open_source(str(spec), option).tokenizer_file
        return file, sha256_file(file) if file else None

    for spec, option in judges:
        judge_file, judge = tokenizer(spec, option)
        for run in runs:
            run_file, mine = tokenizer(run, "RUN_DIR")
            if judge and mine and judge != mine:
                raise UserError(f"{option} {spec}: its tokenizer ({judge_file}) is not the one of {run} ({run_file});"
                                f" it reads other token ids: pass a model of that run's tokenizer")


def load(spec: str | Path, device: str):
    from megagpt.inference import load_for_inference
    from megagpt.init_from import parse_spec

    path, step = parse_spec(str(spec))
    return load_for_inference(path, step, device)


@torch.no_grad()
def reply_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) float64: Σ log π(reply tokens | prompt) of right-padded prompt + reply rows, at `temperature`; mask
    (B, T - 1) is 1 on the positions whose logits predict a reply token (megagpt/rollout.py action_mask)."""
    logp = token_logprobs(model(ids)[0][:, :-1].float() / temperature, ids[:, 1:])
    return (logp.double() * mask).sum(dim=1)


@torch.no_grad()
def answer(model, tokenizer, chunk: list[list[dict]], first: int, known: set[str], reward_model, reference,
           args) -> list[dict]:
    """The sample records of prompts first, first + 1, ... (`chunk`), answered in one batch."""
    end = require_chat_tokens(tokenizer)[END]
    ids = [prompt_ids(tokenizer, check_messages(m, final_role="user"))[-(model.cfg.block_size - 1):] for m in chunk]
    replies = sample_replies(model, ids, end, args.max_new_tokens, args.temperature,
                             [prompt_seed(args.seed, first + k) for k in range(len(chunk))])
    seqs, last = completion_rows([p + r for p, (r, _) in zip(ids, replies, strict=True)])
    seqs = seqs.to(args.device)
    mask = action_mask([len(p) for p in ids], [len(r) for r, _ in replies], seqs.size(1) - 1).to(args.device)
    rows = []
    for messages, (reply, stopped) in zip(chunk, replies, strict=True):
        text = tokenizer.decode([t for t in reply if t != end])
        rows.append({"run": "", "prompt": messages[-1]["content"], "reply": text,
                     "real_word_rate": real_word_rate(text, known), "tokens": len(reply), "stopped": stopped})
    if reward_model is not None:
        for row, score in zip(rows, read_scores(reward_model(seqs)[0], last).tolist(), strict=True):
            row["reward_model_score"] = score
    if reference is not None:
        kl = (reply_logprobs(model, seqs, mask, args.temperature)
              - reply_logprobs(reference, seqs, mask, args.temperature))
        for row, value in zip(rows, kl.tolist(), strict=True):
            row["kl_to_reference"] = value
    return rows


def evaluate_run(path: Path, prompts: list[list[dict]], known: set[str], reward_model, reference, args) -> tuple:
    """(the run's row of the table, its sample records), the prompts answered --batch at a time."""
    model, tokenizer, cfg = load(path, args.device)
    batches = tqdm(range(0, len(prompts), args.batch), desc=f"eval {path.name}", unit="batch", disable=None,
                   leave=False)  # a bar where stderr is a terminal
    try:
        rows = [row for first in batches
                for row in answer(model, tokenizer, prompts[first:first + args.batch], first, known, reward_model,
                                  reference, args)]
    except ValueError as e:  # a character outside a char vocabulary
        raise UserError(f"{path}: a held-out prompt of --data does not fit its tokenizer: {e}") from None
    for row in rows:
        row["run"] = str(path)
    summary = {"run": str(path), "stage": cfg.train.stage, "prompts": len(rows)}
    for key in ("real_word_rate", "reward_model_score", "kl_to_reference"):
        if key in rows[0]:
            summary[key] = sum(r[key] for r in rows) / len(rows)
    summary["response_length"] = sum(r["tokens"] for r in rows) / len(rows)
    summary["stop_rate"] = sum(r["stopped"] for r in rows) / len(rows)
    return summary, rows


def format_table(runs: list[dict]) -> str:
    columns = [("real_word_rate", "real words"), ("reward_model_score", "RM score"), ("kl_to_reference", "KL(SFT)"),
               ("response_length", "length"), ("stop_rate", "stops")]
    shown = [(key, name) for key, name in columns if any(key in r for r in runs)]
    width = max(len(r["run"]) for r in runs)
    lines = [f"{'run':<{width}}  " + "  ".join(f"{name:>10}" for _, name in shown)]
    for r in runs:
        cells = [f"{r[key]:>10.3f}" if key in r else f"{'-':>10}" for key, _ in shown]
        lines.append(f"{r['run']:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt eval prefs", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="RUN_DIR or EXPORT_DIR of each model (e.g. the sft, ppo and dpo runs)")
    p.add_argument("--reward-model", help="a reward model's run or export dir: also report its scores")
    p.add_argument("--reference", help="the SFT model for the KL column (default: the first dpo/ppo run's "
                   "reference)")
    p.add_argument("--data", help="the dir `megagpt prep shakespeare-prefs` wrote (default: a run's "
                   "data.dataset_dir that holds words.txt)")
    p.add_argument("--out", required=True, help="FILE.json: the table and every sample")
    p.add_argument("--limit", type=int, default=200, help="held-out prompts (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="also capped by each model's block_size")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="prompts answered together (the same replies at any "
                   "batch size, up to float rounding)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a small model samples fastest on one)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.limit < 1 or args.max_new_tokens < 1 or args.batch < 1 or args.threads < 1:
        raise UserError("--limit, --max-new-tokens, --batch and --threads must be at least 1")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):  # also false for nan
        raise UserError(f"--temperature {args.temperature}: must be a finite number above 0")
    check_seed(args.seed)
    from megagpt.sample import resolve_device

    args.device = resolve_device(args.device)
    named = [*((r, "RUN_DIR") for r in args.runs), (args.reward_model, "--reward-model"),
             (args.reference, "--reference")]
    missing = next(((path, what) for path, what in named if path and not Path(path).is_dir()), None)
    if missing:  # before the data, which a mistyped run dir would otherwise hide behind
        raise UserError(f"{missing[1]} {missing[0]}: no such directory")
    torch.set_num_threads(args.threads)
    runs = [Path(r) for r in args.runs]
    data = Path(args.data) if args.data else find_data_dir(runs)
    known = load_vocabulary(data / WORDS_FILE)
    if not (data / VAL_PROMPTS).is_file():
        raise UserError(f"--data {data}: no {VAL_PROMPTS}; `megagpt prep shakespeare-prefs` writes it")
    prompts = [json.loads(line)["messages"] for line in (data / VAL_PROMPTS).read_text().splitlines()
               if line.strip()][:args.limit]
    reference_spec = args.reference or find_reference(runs)
    check_tokenizers(runs, [(spec, option) for spec, option in ((args.reward_model, "--reward-model"),
                                                                (reference_spec, "--reference")) if spec])
    reward_model = load(args.reward_model, args.device)[0] if args.reward_model else None
    if reward_model is not None and not hasattr(reward_model, "score"):
        raise UserError(f"--reward-model {args.reward_model}: not a reward model (train.stage: reward)")
    reference = load(reference_spec, args.device)[0] if reference_spec else None
    torch.manual_seed(args.seed)
    table, samples = [], []
    for run in runs:
        summary, rows = evaluate_run(run, prompts, known, reward_model, reference, args)
        table.append(summary)
        samples += rows
    report = {"data": str(data), "reference": reference_spec, "reward_model": args.reward_model,
              "settings": {k: getattr(args, k) for k in ("limit", "max_new_tokens", "temperature", "seed")},
              "runs": table, "samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_whole(args.out, json.dumps(report, indent=1) + "\n")
    print(format_table(table))
    print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0
