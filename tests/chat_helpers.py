"""Helpers for the fine-tuning tests: toy conversations, chat datasets on Tiny Shakespeare's characters, tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import CPU_CONFIG, tiny_overrides

from megagpt.chat_template import ASSISTANT, END, SYSTEM, USER
from megagpt.config import load_config

# Questions and answers written only with Tiny Shakespeare's 65 characters.
BLOCK = 128  # the fine-tuning tests' block_size: a two-exchange toy conversation with a system message fits
QA = [("Who is the prince?", "HAMLET"), ("Who loves Juliet?", "ROMEO"), ("Who is the moor?", "OTHELLO"),
      ("Who is mad?", "LEAR"), ("Who is the shrew?", "KATHARINA"), ("Who rules the isle?", "PROSPERO")]


def conversation(*turns: str, system: str | None = None) -> dict:
    """{"messages": [...]}: the turns alternate user, assistant, user, ..."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return {"messages": messages}


def toy_records(repeat: int = 8) -> list[dict]:
    """One- and two-exchange conversations over QA, some with a system message."""
    records = []
    for k in range(repeat):
        for i, (q, a) in enumerate(QA):
            q2, a2 = QA[(i + k + 1) % len(QA)]
            records.append(conversation(q, a) if (i + k) % 3 else conversation(q, a, q2, a2, system="Be brief."))
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_dataset(out: Path, tokenizer_dir: Path, records: list | None = None, **settings) -> Path:
    """A chat dataset of `records` (default: toy_records()), tokenized as tokenizer_dir's data."""
    from data_prep.chat import ChatPrepSettings, prepare_chat

    source = write_jsonl(out.with_name(out.name + ".jsonl"), records or toy_records())
    return prepare_chat([source], out, tokenizer_dir, ChatPrepSettings(**{"val_fraction": 0.2, **settings}),
                        force=True)[0]


def sft_overrides(dataset_dir: Path, **train) -> list[str]:
    """tiny_overrides for the sft stage, quiet; keyword arguments are train.* (model_<key>, zero_stage too)."""
    defaults = {"stage": "sft", "sample_tokens": 0, "warmup_steps": 0, "lr_decay_steps": 100,
                "model_block_size": BLOCK}
    return tiny_overrides(dataset_dir, tensorboard=False, **{**defaults, **train})


def pretrain_overrides(dataset_dir: Path, **train) -> list[str]:
    """A tiny pre-training run with the fine-tuning tests' block size (the shape their init_from gives)."""
    defaults = {"max_steps": 4, "eval_interval": 4, "checkpoint_interval": 4, "sample_tokens": 0,
                "model_block_size": BLOCK}
    return tiny_overrides(dataset_dir, tensorboard=False, **{**defaults, **train})


def run_config(overrides: list[str]):
    return load_config(CPU_CONFIG, overrides)


def train_run(run_dir: Path, overrides: list[str]):
    from megagpt.train import train

    return train(run_config(overrides), run_dir)


def reference_reply(model, ids, stop, max_new_tokens, temperature=0.0, generator=None) -> tuple[list[int], bool]:
    """Token by token with the whole window recomputed each time (no cache); stop token excluded."""
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([(ids + out)[-model.cfg.block_size:]]))[0][0, -1].double()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logits / temperature, -1).float(), 1, generator=generator))
            if token == stop:
                return out, True
            out.append(token)
    return out, False


def chat_prompt(tokenizer, *turns: str, system: str | None = None) -> list[int]:
    """The template spelled out: [<system> text <end>] (<user> text <end> <assistant> reply <end>)... <assistant>."""
    s = tokenizer.special_tokens
    ids = [s[SYSTEM], *tokenizer.encode(system), s[END]] if system else []
    for i, text in enumerate(turns):
        ids += [s[USER] if i % 2 == 0 else s[ASSISTANT], *tokenizer.encode(text), s[END]]
    return ids + [s[ASSISTANT]]
