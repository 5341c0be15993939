"""Config errors are one line that names the key; bases and overrides resolve before anything is built."""

from pathlib import Path

import pytest

from megagpt.cli import main as cli_main
from megagpt.config import ConfigError, load_config
from megagpt.ds_config import deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_hed=4", "model.n_hed"),
        ("model.n_embd=100", "model.n_embd"),  # not divisible by 6 heads
        ("model.block_size=0", "model.block_size"),
        ("train.lr=fast", "train.lr"),
        ("train.dtype=fp8", "train.dtype"),
        ("model.attention=flash", "model.attention"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("train.min_lr=1", "train.min_lr"),
        ("optimizer.lr=1", "optimizer"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "shakespeare_char.yaml", [override])
    message = str(err.value)
    assert key in message and f"--set {override}" in message  # where the bad value came from
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["train.lrr=3e-4"], "--set train.lrr=3e-4: unknown key 'train.lrr': did you mean 'train.lr'?"),
        (["trian.lr=3e-4"], "--set trian.lr=3e-4: unknown key 'trian': did you mean 'train'?"),
        (["train.lr=1", "train.lr=fast"], "--set train.lr=fast: train.lr: "),  # the last one is applied
        (["model.n_layer=2", "model.n_embd=100"],  # a cross-key check fails on the section: both are named
         "shakespeare_char.yaml with --set model.n_layer=2 and --set model.n_embd=100: model.n_embd (100)"),
        (["train.zzz=1"], "--set train.zzz=1: unknown key 'train.zzz' (check its spelling and section)"),
    ],
)
def test_an_error_names_the_set_it_came_from_and_the_nearest_known_key(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "shakespeare_char.yaml", overrides)
    assert says in str(err.value)


def test_cpu_config_extends_the_base_and_overrides_apply():
    cfg = load_config(CONFIGS / "shakespeare_char_cpu.yaml", ["train.lr=3e-4", "model.dropout=0.1"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (4, 128, 64)
    assert cfg.train.beta2 == 0.99  # inherited from shakespeare_char.yaml
    assert cfg.train.lr == 3e-4 and cfg.model.dropout == 0.1


def test_the_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 3\n")
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.n_layers" in err and "bad.yaml" in err
    assert "did you mean 'model.n_layer'?" in err


def test_base_loops_are_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_gradient_accumulation_comes_from_global_batch_tokens():
    cfg = load_config(CONFIGS / "shakespeare_char_cpu.yaml", ["train.global_batch_tokens=3072"])
    ds = deepspeed_config(cfg, world_size=2)  # 3072 / (12 × 64 × 2) = 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 48
    with pytest.raises(ConfigError, match="global_batch_tokens"):
        deepspeed_config(cfg, world_size=3)


def test_adam_is_torchs_fused_adamw_unless_the_optimizer_is_offloaded():
    """DeepSpeed's FusedAdam would JIT-build a CUDA extension (nvcc, ninja) on first use; torch's needs none."""
    import torch

    from megagpt.distributed import init_distributed
    from megagpt.engine import build_engine
    from megagpt.model import GPT

    cfg = load_config(CONFIGS / "shakespeare_char_cpu.yaml",
                      ["model.vocab_size=65", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"])
    engine = build_engine(cfg, init_distributed(cfg.deepspeed.timeout_minutes), lambda: GPT(cfg.model))
    assert type(engine.optimizer) is torch.optim.AdamW and engine.optimizer.defaults["fused"] is True
    offloaded = load_config(CONFIGS / "shakespeare_char_cpu.yaml", ["deepspeed.offload_optimizer=cpu",
                                                                     "deepspeed.zero_stage=2"])
    params = deepspeed_config(offloaded, world_size=1)["optimizer"]["params"]
    assert "torch_adam" not in params  # ZeRO-Offload requires DeepSpeed's CPU Adam
