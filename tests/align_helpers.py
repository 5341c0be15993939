"""Helpers for the alignment tests: toy preference pairs, the tiny model chain base -> sft -> reward (built once
per test session and shared by test_alignment.py and test_ppo.py), and the alignment stages' overrides."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from chat_helpers import QA, chat_dataset, pretrain_overrides, sft_overrides, train_run, write_jsonl
from helpers import tiny_overrides

BLOCK = 64  # prompt + reply of every toy pair fits; the rollouts' replies are capped by it
WRONG = ["xq zv", "qqqq", "zzkx vv", "jjj", "vxq", "kzz qx"]


def toy_pairs(repeat: int = 6) -> list[dict]:
    """{"prompt", "chosen", "rejected"}: the right answer over a garbled one; prompts as text and as messages."""
    records = []
    for k in range(repeat):
        for i, (question, answer) in enumerate(QA):
            prompt = question if (i + k) % 2 else [{"role": "user", "content": question}]
            records.append({"prompt": prompt, "chosen": answer, "rejected": WRONG[(i + k) % len(WRONG)]})
    return records


def preference_dataset(out: Path, tokenizer_dir: Path, records: list | None = None, **settings) -> Path:
    from data_prep.preferences import PreferenceSettings, prepare_preferences

    source = write_jsonl(out.with_name(out.name + ".jsonl"), records or toy_pairs())
    return prepare_preferences([source], out, tokenizer_dir,
                               PreferenceSettings(**{"val_fraction": 0.2, **settings}), force=True)[0]


def stage_overrides(stage: str, dataset_dir: Path, init_from: Path, **values) -> list[str]:
    """A tiny, quiet run of an alignment stage; `align_<key>` sets align.<key>, the rest as tiny_overrides."""
    align = {k.removeprefix("align_"): values.pop(k) for k in list(values) if k.startswith("align_")}
    defaults = {"stage": stage, "init_from": str(init_from), "sample_tokens": 0, "warmup_steps": 0,
                "lr_decay_steps": 100, "max_steps": 3, "eval_interval": 1000, "checkpoint_interval": 1000,
                "micro_batch_size": 4, "model_block_size": BLOCK}
    return [*tiny_overrides(dataset_dir, tensorboard=False, **{**defaults, **values}),
            *(f"align.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in align.items())]


_CHAIN: dict[str, dict[str, Path]] = {}


def model_chain(shakespeare_dataset: Path, root: Path) -> dict[str, Path]:
    """base (pre-trained 4 steps) -> sft (4 steps on toy chats) -> prefs (toy pairs, the sft tokenizer) ->
    reward (4 steps); built once per session (both alignment test files share it)."""
    key = str(shakespeare_dataset)
    if key not in _CHAIN:
        base, sft, reward = root / "base", root / "sft", root / "reward"
        train_run(base, pretrain_overrides(shakespeare_dataset, model_block_size=BLOCK))
        chats = chat_dataset(root / "chats", shakespeare_dataset)
        train_run(sft, sft_overrides(chats, init_from=str(base), max_steps=4, model_block_size=BLOCK))
        prefs = preference_dataset(root / "prefs", sft)
        train_run(reward, stage_overrides("reward", prefs, sft, max_steps=4, lr=3e-3))
        _CHAIN[key] = {"base": base, "sft": sft, "prefs": prefs, "reward": reward, "chats": chats}
    return _CHAIN[key]


def train_steps(cfg, run_dir: Path, steps: int):
    """build_run, then `steps` of the stage's train_step at the config's LR: the Run (its stage's frozen models
    and engine) for a test to inspect."""
    from megagpt.train import build_run

    run = build_run(cfg, run_dir)
    try:
        for _ in range(steps):
            run.stage.train_step(run.engine, run.guard)
    finally:
        run.log.close()
        if run.lock is not None:
            run.lock.release()
    return run


def write_reward_export(out: Path, reward_run: Path, bias: float) -> Path:
    """`megagpt export` of a reward run, its head then set to w = 0, b = bias: a reward model scoring every text
    `bias`."""
    from safetensors.torch import load_file, save_file

    from megagpt.export import export

    export(reward_run, out)
    state = load_file(str(out / "model.safetensors"))
    state["score.weight"] = torch.zeros_like(state["score.weight"])
    state["score.bias"] = torch.full_like(state["score.bias"], bias)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
