"""The GPT-3 family configs: valid, the paper's sizes and schedule, the planner's choices written in them."""

from pathlib import Path

import pytest

from megagpt import plan as planner
from megagpt.config import load_config
from megagpt.plan_memory import closed_form_params, count_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Table 2.1's nominal sizes; the paper counts every trainable parameter, embeddings included.
NOMINAL = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9,
           "13b": 13e9, "175b": 175e9}
# Table 2.1: head size, batch size in tokens (M), learning rate.
TABLE = {"125m": (64, 0.5, 6.0e-4), "350m": (64, 0.5, 3.0e-4), "760m": (96, 0.5, 2.5e-4),
         "1.3b": (128, 1, 2.0e-4), "2.7b": (80, 1, 1.6e-4), "6.7b": (128, 2, 1.2e-4), "13b": (128, 2, 1.0e-4),
         "175b": (128, 3.2, 0.6e-4)}


def family_path(size: str) -> Path:
    return ROOT / "configs" / f"gpt3_{size}.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    load_config(path)


def test_the_family_has_every_size_of_table_2_1():
    assert {p.name for p in CONFIGS} >= {f"gpt3_{size}.yaml" for size in NOMINAL} | {"gpt3_base.yaml"}


@pytest.mark.parametrize("size", NOMINAL)
def test_parameter_count_is_the_papers_nominal_size_with_embeddings(size):
    cfg = load_config(family_path(size))
    params = count_params(cfg.model)  # on the meta device
    assert params.total == closed_form_params(cfg.model)
    assert abs(params.total / NOMINAL[size] - 1) < 0.03, f"{params.total / 1e6:.0f}M vs nominal {size}"


@pytest.mark.parametrize("size", NOMINAL)
def test_shape_batch_lr_and_schedule_follow_the_paper(size):
    cfg = load_config(family_path(size))
    m, t = cfg.model, cfg.train
    head_dim, batch_millions, lr = TABLE[size]
    assert m.n_embd == m.n_head * head_dim == m.n_head * m.head_dim
    assert m.block_size == 2048 and m.vocab_size == 50304 and t.dtype == "bf16"
    assert (m.attention, m.norm) == ("sdpa", "torch") and m.note
    assert t.global_batch_tokens % m.block_size == 0
    assert abs(t.global_batch_tokens / (batch_millions * 1e6) - 1) < 0.05  # whole sequences of 2048 tokens
    assert t.lr == pytest.approx(lr) and t.min_lr == pytest.approx(lr / 10)
    assert (t.weight_decay, t.beta2, t.grad_clip) == (0.1, 0.95, 1.0)
    assert t.warmup_steps == round(375e6 / t.global_batch_tokens)
    assert t.lr_decay_steps == round(260e9 / t.global_batch_tokens)
    assert (t.max_steps - 1) * t.global_batch_tokens < 300e9 <= t.max_steps * t.global_batch_tokens


@pytest.mark.parametrize("size", NOMINAL)
def test_written_choices_are_the_planners(size, monkeypatch, capsys):
    import json

    path = family_path(size)
    assert load_config(path).planner is not None, f"{path.name} does not record the hardware it was planned for"
    args = planner.planner_args(load_config(path), f"configs/{path.name}")
    assert "--gpu" in args
    monkeypatch.chdir(ROOT)
    assert planner.main([*args, "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    cfg = load_config(path)
    assert cfg.deepspeed.zero_stage == choice["zero_stage"]
    assert cfg.train.micro_batch_size == choice["micro_batch_size"]
    assert cfg.model.activation_checkpointing == choice["activation_checkpointing"]
    assert choice["grad_accum_steps"] is not None  # the batch splits evenly over the planned GPUs
