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
        ("train.seed=-1", "train.seed"),  # no generator takes it (torch's, numpy's): a traceback at the first step
        (f"train.seed={2**63}", "train.seed"),
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


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["model.attention=triton", "model.n_embd=32", "model.n_head=4"],  # head dim 8: a traceback at step 1
         "model.attention: triton: head dim model.n_embd / model.n_head = 32 / 4 = 8 unsupported (the kernel takes "
         "16 <= D <= 128)"),
        (["model.attention=triton", "model.n_embd=512", "model.n_head=2"], "= 256 unsupported"),
        (["model.norm=triton", "model.n_embd=65537", "model.n_head=1"],
         "model.norm: triton: model.n_embd=65537 unsupported (the kernel takes 1 <= C <= 65536)"),
    ],
)
def test_a_shape_the_triton_kernels_cannot_take_is_refused_with_the_config(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "shakespeare_char.yaml", overrides)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cpu_config_extends_the_base_and_overrides_apply():
    cfg = load_config(CONFIGS / "shakespeare_char_cpu.yaml", ["train.lr=3e-4", "model.dropout=0.1"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (4, 128, 64)
    assert cfg.train.beta2 == 0.99  # inherited from shakespeare_char.yaml
    assert cfg.train.lr == 3e-4 and cfg.model.dropout == 0.1


def test_the_run_name_is_the_config_files_own_never_a_bases(tmp_path):
    """runs/<name>: a config that extends another and sets no name must not train on in the other's run dir."""
    (tmp_path / "my_lr.yaml").write_text(f"base: {CONFIGS / 'shakespeare_char_cpu.yaml'}\ntrain:\n  lr: 3.0e-4\n")
    (tmp_path / "my_sft.yaml").write_text("train: {stage: sft}\n")
    (tmp_path / "named.yaml").write_text("base: my_lr.yaml\nname: mine\n")
    assert load_config(tmp_path / "my_lr.yaml").name == "my_lr"
    assert load_config(tmp_path / "my_sft.yaml").name == "my_sft"
    assert load_config(tmp_path / "named.yaml").name == "mine"
    assert load_config(tmp_path / "named.yaml", ["name=other"]).name == "other"
    assert load_config(CONFIGS / "shakespeare_sft_cpu.yaml").name == "shakespeare_sft_cpu"


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


def test_a_key_error_names_the_file_that_set_the_key_a_base_file_included(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  n_layr: 2\ntrain:\n  lr: -1\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  warmup_steps: -5\n")
    with pytest.raises(ConfigError, match=r"^\S*base\.yaml: unknown key 'model\.n_layr'"):
        load_config(tmp_path / "top.yaml")
    (tmp_path / "base.yaml").write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"^\S*base\.yaml: train\.lr"):  # set in the base alone
        load_config(tmp_path / "top.yaml", ["train.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"^\S*top\.yaml: train\.warmup_steps"):  # the top file's own key
        load_config(tmp_path / "top.yaml", ["train.lr=0.1"])


@pytest.mark.parametrize("text, says", [
    ("model:\n  n_layer: 2\n  n_head: 2\n  n_layer: 3\n", "line 4, column 3: not valid YAML: key 'n_layer' given "
                                                          "twice (first on line 2)"),
    ("model:\n  n_layer: 2\n   n_head: 3\n", "line 3, column 10: not valid YAML: mapping values are not allowed"),
    ("model:\n\tn_layer: 2\n", "line 2, column 1: not valid YAML: found character '\\t'"),
    ("base: 3\n", "base: expected a config file's path or a list of them (got 3)"),
    ("base: nowhere.yaml\n", "base: nowhere.yaml: no such config file"),
    ("train:\n  max_steps: yes\n", "train.max_steps: a boolean where this key takes none"),
    ("train:\n  lr: .inf\n", "train.lr: Input should be a finite number"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_line_or_key(tmp_path, text, says):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).startswith(str(bad)) and says in str(err.value) and "\n" not in str(err.value)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: caf\xe9\n")  # latin-1
    with pytest.raises(ConfigError, match=r"bad.yaml: not UTF-8 text \(byte 9\)"):
        load_config(bad)


def test_a_merge_key_may_be_overridden_and_a_boolean_stays_a_boolean(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("deepspeed:\n  extra: &m {n_layer: 2, bias: yes}\nmodel:\n  <<: *m\n  n_layer: 3\n")
    cfg = load_config(good)
    assert cfg.model.n_layer == 3 and cfg.model.bias is True


@pytest.mark.parametrize("override, says", [
    ("model.n_layer=[1", "--set 'model.n_layer=[1': the value at column 3: not valid YAML"),
    ("deepspeed.extra={a: 1, a: 2}", "key 'a' given twice"),
    ("train.lr=1e309", "train.lr: Input should be a finite number"),
])
def test_a_set_value_that_is_not_yaml_or_not_finite_is_one_line(override, says):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "shakespeare_char.yaml", [override])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_numbers_in_exponent_notation_are_numbers_in_deepspeed_extra_too(tmp_path):
    # YAML 1.1 reads 1e-8 and 5e8 as text, which reached DeepSpeed's optimizer as the string '1e-8'
    path = tmp_path / "c.yaml"
    path.write_text("deepspeed:\n  extra:\n    zero_optimization: {reduce_bucket_size: 5e8}\n")
    cfg = load_config(path, ["deepspeed.extra.optimizer.params.eps=1e-8", "train.lr=3E-4",
                             "deepspeed.extra.name='1e3'"])
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["optimizer"]["params"]["eps"] == 1e-8 and ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert cfg.train.lr == 3e-4 and ds["name"] == "1e3"  # quoted: still text


@pytest.mark.parametrize("override, own", [
    ("deepspeed.extra.zero_optimization.stage=3", "deepspeed.zero_stage"),
    ("deepspeed.extra.train_micro_batch_size_per_gpu=4", "train.micro_batch_size"),  # was DeepSpeed's traceback
    ("deepspeed.extra.bf16={enabled: true}", "train.dtype"),
    ("deepspeed.extra.optimizer.params.lr=0.1", "train.lr"),  # the loop sets the LR each step: silently unused
])
def test_deepspeed_extra_may_not_override_what_megagpt_generates(override, own):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "shakespeare_char.yaml", [override])
    assert f"--set {override}" in str(err.value) and f"set {own} instead" in str(err.value)
    tuning = ["deepspeed.extra.zero_optimization.overlap_comm=true", "deepspeed.extra.optimizer.params.eps=1e-6"]
    ds = deepspeed_config(load_config(CONFIGS / "shakespeare_char.yaml", tuning), world_size=1)
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True} and ds["optimizer"]["params"]["eps"] == 1e-6


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
