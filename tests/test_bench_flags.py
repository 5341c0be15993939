"""`megagpt bench train` and `bench syncs`: a bad count, stage, dtype or --json is one line before any run."""

from pathlib import Path

import pytest
from helpers import CPU_CONFIG

from benchmarks import train as bench_train
from megagpt.cli import main
from megagpt.config import load_config, save_config


@pytest.mark.parametrize("flags, named", [
    (["--steps", "5", "--skip", "-1"], "--skip must be at least 0"),
    (["--steps", "5", "--skip", "1", "--rounds", "0", "--against", "TMP"], "--rounds at least 1"),
    (["--steps", "5", "--skip", "1", "--rounds", "2"], "--rounds 2: counts A B pairs with --against"),  # was ignored
    (["--steps", "3", "--skip", "3"], "--skip 3 must be smaller than --steps 3"),
    (["--steps", "3", "--skip", "1", "--json", "TMP"], "is a folder; give a file name"),
    (["--steps", "3", "--skip", "1", "--json", "TMP/missing/x.json"], "missing is not a folder"),
])
def test_bench_train_refuses_counts_and_json_before_running(flags, named, tmp_path, capsys):
    assert main(["bench", "train", str(CPU_CONFIG), *[f.replace("TMP", str(tmp_path)) for f in flags]]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


def test_bench_train_counts_every_accumulated_micro_batch_and_nanogpt_runs_as_many():
    """global_batch_tokens gives 4 micro-batches a step: tokens/s was reported 4x too low, and nanoGPT ran 1."""
    cfg = load_config(CPU_CONFIG, ["train.micro_batch_size=4", "model.block_size=16",
                                   "train.global_batch_tokens=256"])
    assert bench_train.tokens_per_step(cfg) == 256
    assert bench_train.summarise([{"megagpt": 10.0}], 256)["megagpt"]["tokens_per_sec"] == 25600
    assert "--gradient_accumulation_steps=4" in bench_train.nanogpt_args(cfg, 30, Path("out"))



def test_bench_train_prints_each_sides_dtype_as_the_run_trained(tmp_path, capsys):
    """megagpt's is read from the run's config.yaml (where `auto` is already resolved), nanoGPT's is fp32."""
    save_config(load_config(CPU_CONFIG, ["train.dtype=bf16"]), tmp_path / "config.yaml")
    dtypes = {"megagpt": bench_train.trained_dtype(tmp_path), "nanogpt": "fp32"}
    bench_train._print({**bench_train.summarise([{"megagpt": 15.0, "nanogpt": 30.0}], 768), "dtypes": dtypes})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("megagpt") and lines[0].endswith("(median)  bf16")
    assert lines[1].startswith("nanogpt") and lines[1].endswith("(median)  fp32")
    assert lines[2] == "megagpt / nanoGPT tokens/s: 2.000 (pairs: 2.000)"

@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--zero-stages", "0,5"], "--zero-stages 0,5 --dtypes fp32,bf16: '5', 'fp32': deepspeed.zero_stage"),
    (["--dtypes", "fp32,fp8"], "'fp8': train.dtype"),
])
def test_bench_syncs_names_its_own_flag_before_the_first_run(flags, named, capsys):
    assert main(["bench", "syncs", str(CPU_CONFIG), *flags]) == 2
    printed = capsys.readouterr()
    assert named in printed.err and "zero" not in printed.out  # no table begun: no run started
