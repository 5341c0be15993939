"""A member of the GPT-3 family, shrunk with --set only, trains on the same code path (checkpointing on)."""

import json

import pytest
from helpers import CONFIGS, train_records

from megagpt.config import load_config
from megagpt.train import train

GPT3_125M = CONFIGS / "gpt3_125m.yaml"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_shrunk_gpt3_trains_with_activation_checkpointing(shakespeare_dataset, tmp_path, dtype):
    shrink = [
        "model.n_layer=2",
        "model.n_embd=64",
        "model.n_head=2",
        "model.block_size=32",
        "model.activation_checkpointing=true",
        f"train.dtype={dtype}",
        "train.micro_batch_size=4",
        "train.global_batch_tokens=256",  # 4 × 32 × 2 micro-batches
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.lr_decay_steps=8",
        "train.eval_interval=8",
        "train.eval_steps=1",
        "train.log_interval=1",
        "train.sample_tokens=0",
        "train.checkpoint_interval=8",
        f"data.dataset_dir={shakespeare_dataset}",
        "logging.progress_bar=false",
        "train.threads=1",
    ]
    cfg = load_config(GPT3_125M, shrink)
    assert cfg.model.vocab_size == 50304 and cfg.train.beta2 == 0.95  # the family's own settings stay
    train(cfg, tmp_path)
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert len(losses) == 8 and all(l == l for l in losses)  # noqa: E741 - finite, no NaN
    assert losses[-1] < losses[0]
    saved = json.loads((tmp_path / "checkpoints" / "step_000008" / "megagpt_manifest.json").read_text())
    assert saved["model"]["vocab_size"] == 50304
