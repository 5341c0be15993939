"""The `megagpt` command as a user types it: train prepares its data, sample reads the run, bench train times."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import CPU_CONFIG, REPO, TINY_MODEL

from megagpt import cli
from megagpt.hardware import resolve_dtype

TINY = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]


def megagpt(*args, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("megagpt") or None
    cmd = [exe] if exe else [sys.executable, "-m", "megagpt"]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_prepares_missing_data_then_sample_reads_the_run(tmp_path, capsys):
    data_dir, run_dir = tmp_path / "data" / "shakespeare_char", tmp_path / "run"
    sets = [
        *TINY,
        f"data.dataset_dir={data_dir}",
        "train.max_steps=12",
        "train.eval_interval=6",
        "train.eval_steps=2",
        "train.checkpoint_interval=6",
        "train.sample_tokens=8",
        "logging.progress_bar=false",
    ]
    result = megagpt("train", CPU_CONFIG, *[a for s in sets for a in ("--set", s)], "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (data_dir / "manifest.json").is_file()
    assert "step 12: val loss" in result.stdout + result.stderr
    # sample's own command line, in this process (the command as a process is train's above)
    assert cli.main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "1"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("ROMEO:") and len(sample.rstrip("\n")) >= len("ROMEO:") + 20


def test_sample_of_a_directory_without_a_run_is_a_one_line_error(tmp_path):
    result = megagpt("sample", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(tmp_path) in result.stderr


NANOGPT = REPO.parent / "shared" / "anchors" / "nanoGPT"


@pytest.mark.skipif(not NANOGPT.is_dir(), reason=f"nanoGPT not found at {NANOGPT}")
def test_bench_train_runs_megagpt_and_nanogpt_side_by_side(shakespeare_dataset, tmp_path):
    sets = [*TINY, f"data.dataset_dir={shakespeare_dataset}", "train.threads=1", "train.eval_interval=1000",
            "train.eval_steps=1", "train.sample_tokens=0"]
    out = tmp_path / "bench.json"
    result = megagpt("bench", "train", CPU_CONFIG, *[a for s in sets for a in ("--set", s)], "--steps", 8,
                     "--skip", 2, "--rounds", 2, "--against", NANOGPT, "--json", out)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(out.read_text())
    assert len(numbers["rounds"]) == 2 and all(set(r) == {"megagpt", "nanogpt"} for r in numbers["rounds"])
    assert all(r[name] > 0 for r in numbers["rounds"] for name in r)
    pairs = [r["nanogpt"] / r["megagpt"] for r in numbers["rounds"]]
    assert numbers["speedup_pairs"] == pytest.approx(pairs)
    assert "megagpt / nanoGPT tokens/s" in result.stdout
    mine = resolve_dtype("auto")  # the CPU config's dtype on this machine; nanoGPT's train.py is fp32 on a CPU
    assert numbers["dtypes"] == {"megagpt": mine, "nanogpt": "fp32"}
    assert f"(median)  {mine}" in result.stdout and "(median)  fp32" in result.stdout
    assert not (NANOGPT / "out-bench").exists() and not (NANOGPT / "data" / "shakespeare_char" / "train.bin").exists()


@pytest.mark.parametrize("argv, says", [
    (["trian", "configs/shakespeare_char_cpu.yaml"], "unknown command 'trian': did you mean 'train'?"),
    (["bench", "kernls"], "unknown command 'bench kernls': did you mean 'bench kernels'?"),
    (["eval"], "'eval' needs one of: eval qa, eval prefs"),
    (["frobnicate"], "unknown command 'frobnicate' (megagpt -h lists the commands)"),
])
def test_a_mistyped_command_is_one_line_naming_it_and_the_nearest_one(argv, says, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megagpt: error: ") and says in err


def test_version_is_the_packages_as_pyproject_states_it(capsys):
    assert cli.main(["--version"]) == 0
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert capsys.readouterr().out == f"megagpt {version}\n"


@pytest.mark.parametrize("argv, says", [
    (["train", str(CPU_CONFIG), "--check-ranks", "0"], "megagpt train: error: --check-ranks 0: must be at least 1"),
    (["eval", "qa", "RUN", "--data", "RUN", "--device", "tpu"],
     "megagpt eval qa: error: --device 'tpu': expected cpu or cuda (or cuda:N)"),
    (["eval", "prefs", "RUN", "--out", "x.json", "--device", "tpu"],
     "megagpt eval prefs: error: --device 'tpu': expected cpu or cuda (or cuda:N)"),
    (["eval", "prefs", "RUN", "--out", "x.json", "--threads", "0"], "--batch and --threads must be at least 1"),
    (["eval", "prefs", "RUN", "--out", "x.json", "--temperature", "nan"],
     "--temperature nan: must be a finite number above 0"),
])
def test_out_of_range_arguments_are_one_line_before_any_model_loads(argv, says, tmp_path, capsys):
    """Before, --device tpu was torch's traceback and --check-ranks 0 a ZeroDivisionError (with a global batch)."""
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    if argv[0] == "train":  # the batch then depends on the rank count
        argv += ["--set", "train.global_batch_tokens=8192"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


@pytest.mark.parametrize("group, commands", [("bench", ["kernels", "data", "train", "syncs", "val"]),
                                             ("eval", ["qa", "prefs"]), ("data", ["verify"])])
def test_a_group_of_commands_answers_help_with_its_commands(group, commands, capsys):
    # before, `megagpt bench -h` was "unknown command 'bench -h': did you mean 'bench val'?", exit 2
    assert cli.main([group, "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: megagpt {group} COMMAND") and all(f"megagpt {group} {c}\n" in out for c in commands)


def test_prep_help_lists_every_kind_the_readme_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prep", "-h"])
    out = capsys.readouterr().out
    for kind in ("char", "sentencepiece", "shakespeare", "chat", "shakespeare-qa", "preferences", "shakespeare-prefs"):
        assert f"    {kind} " in out or f"    {kind}\n" in out, kind
