"""`megagpt sweep`: every point trained as its own run, finished points skipped, an interrupted point resumed."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from dist_helpers import child_env, metrics, set_args, tiny, wait_for
from helpers import CPU_CONFIG, REPO

from megagpt.cli import main
from megagpt.config import load_config
from megagpt.errors import UserError
from megagpt.model import GPT
from megagpt.sweep import parse_grid

pytestmark = pytest.mark.distributed  # spawns `megagpt train` processes


def commands_run(out, point) -> int:
    """How many times the sweep started `megagpt train` for a point (each start is logged with its command)."""
    return sum(line.startswith("$ ") for line in (out / point / "sweep.log").read_text().splitlines())


def unswept(overrides: list[str], *keys: str) -> list[str]:
    """The overrides without the keys a grid sweeps (sweep refuses a --set of a swept key)."""
    return [item for item in overrides if item.partition("=")[0] not in keys]


def test_sweep_trains_every_point_once_and_tabulates_them(shakespeare_dataset, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(CPU_CONFIG), "--grid", "train.lr=1e-3,3e-3", "--grid", "model.n_embd=16",
            *set_args(unswept(tiny(shakespeare_dataset, max_steps=4, eval_interval=4), "train.lr", "model.n_embd")),
            "--out", str(out)]
    assert main(args) == 0
    points = ["lr=1e-3__n_embd=16", "lr=3e-3__n_embd=16"]
    assert [commands_run(out, p) for p in points] == [1, 1]
    rows = json.loads((out / "results.json").read_text())
    assert [r["point"] for r in rows] == points and [r["train.lr"] for r in rows] == ["1e-3", "3e-3"]
    for row in rows:
        run_dir = out / row["point"]
        assert row["val_loss"] == next(r["val_loss"] for r in metrics(run_dir) if "val_loss" in r and r["step"] == 4)
        cfg = load_config(run_dir / "config.yaml")
        with torch.device("meta"):
            model = GPT(cfg.model)
        assert (cfg.model.n_embd, cfg.train.lr) == (16, float(row["train.lr"]))
        assert row["tokens"] == 4 * 4 * 32  # 4 steps of 4 sequences of 32 tokens (one rank, no accumulation)
        assert row["flops"] == model.flops_per_token() * row["tokens"] and row["wall_s"] > 0
    assert (out / "results.csv").read_text().splitlines()[0].startswith("train.lr,model.n_embd,point,status")
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (out / "val_loss_vs_lr.png").stat().st_size > 0

    capsys.readouterr()
    assert main(args) == 0  # again: nothing left to train
    assert [commands_run(out, p) for p in points] == [1, 1]
    assert capsys.readouterr().out.count("done (skipped)") == 2


@pytest.mark.slow
def test_an_interrupted_point_resumes_from_its_checkpoint(shakespeare_dataset, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "megagpt", "sweep", str(CPU_CONFIG), "--grid", "train.lr=2e-3",
            *set_args(unswept(tiny(shakespeare_dataset, max_steps=150, eval_interval=150, checkpoint_interval=5,
                                   keep_checkpoints=2), "train.lr")), "--out", str(out)]
    sweep = subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, text=True)
    run_dir = out / "lr=2e-3"
    wait_for(lambda: list((run_dir / "checkpoints").glob("step_*")), 120, "a first checkpoint")
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C in a terminal: the sweep and its `megagpt train`
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, err
    assert "run the same command to resume" in err
    stopped = max(r["step"] for r in metrics(run_dir) if "loss" in r)
    assert stopped < 150, "the point finished before the interrupt"

    # The same command again, in this process (its `megagpt train` is a process of its own either way), with the
    # environment the interrupted sweep had.
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    assert main(args[3:]) == 0
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 151))  # resumed where the checkpoint was: no step twice, none missing
    assert commands_run(out, "lr=2e-3") == 2
    assert "resumed from step_" in (run_dir / "sweep.log").read_text()
    assert json.loads((out / "results.json").read_text())[0]["status"] == "done"


@pytest.mark.parametrize("item, message", [("train.lr", "expected KEY=V1,V2"), ("train.lr=", "expected KEY"),
                                           ("train.lr=1,1", "listed twice"),
                                           # one number written two ways: the same run twice, under two names
                                           ("train.lr=0.001,3e-3,1e-3", "0.001 and 1e-3 are one value"),
                                           ("model.attention=sdpa,'sdpa'", "sdpa and 'sdpa' are one value")])
def test_bad_grid_is_one_line(item, message):
    from megagpt.errors import UserError

    with pytest.raises(UserError, match=message):
        parse_grid([item])


def test_a_typo_in_a_swept_key_fails_before_anything_runs(tmp_path, capsys):
    code = main(["sweep", str(CPU_CONFIG), "--grid", "train.lrr=1e-3,2e-3", "--out", str(tmp_path / "s")])
    assert code == 2 and "train.lrr" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, named", [
    (["--grid", "model.n_embed=32,64"], "--grid model.n_embed=32,64: unknown key 'model.n_embed': did you mean "
                                        "'model.n_embd'?"),
    (["--grid", "model.n_embd=32,abc", "--grid", "train.lr=1e-3"], "--grid model.n_embd=32,abc: model.n_embd: "),
    (["--grid", "train.lr=1e-3", "--set", "train.lrr=1"], "--set train.lrr=1: unknown key 'train.lrr'"),
    (["--grid", "model.attention=[math,sdpa]"],  # a value that is not YAML was named as a --set
     "--grid model.attention=[math,sdpa] ('model.attention=[math'): the value at column 6: not valid YAML"),
    (["--grid", "train.lr=1e-3,2e-3", "--set", "train.lr=5e-3", "--launcher", "true"],  # the --set was lost
     "--set train.lr=5e-3 and --grid train.lr: the grid sets this key at every point")])
def test_a_bad_key_or_value_is_named_as_the_user_typed_it(tmp_path, capsys, args, named):
    assert main(["sweep", str(CPU_CONFIG), *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megagpt sweep: error: {named}") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage, says", [
    (lambda out: (out / "sweep.json").write_text('{"config'), "sweep.json: not valid JSON"),
    (lambda out: (out / "sweep.json").write_text("[]"), "sweep.json: a JSON list, expected an object"),
    (lambda out: (out / "lr=1e-3" / "sweep_point.json").write_text('{"wall_s": 1'),
     "lr=1e-3/sweep_point.json: not valid JSON"),
    (lambda out: (out / "lr=1e-3" / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n'),
     "lr=1e-3/metrics.jsonl, line 1: not a metrics record"),
])
def test_a_damaged_sweep_file_is_one_line_naming_it(tmp_path, capsys, damage, says):
    """Files a sweep wrote, torn or edited: before, a JSON traceback on the next run of the same command."""
    out = tmp_path / "sweep"
    args = ["sweep", str(CPU_CONFIG), "--grid", "train.lr=1e-3", "--launcher", "true", "--out", str(out)]
    assert main(args) == 0
    damage(out)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err  # the last line, after the progress bar's
    assert err.rstrip("\n").split("\n")[-1].startswith(f"megagpt sweep: error: {out}/{says}")
    assert "Traceback" not in err


def test_a_torn_last_metrics_line_counts_as_unfinished_not_as_an_error(tmp_path):
    from megagpt.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not a metrics record"):
        read_metrics(tmp_path)


def test_an_out_that_is_a_file_and_a_point_name_too_long_for_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("notes")
    args = ["sweep", str(CPU_CONFIG), "--grid", "train.lr=1e-3", "--launcher", "true"]
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'}: is a file" in capsys.readouterr().err
    prompt = "x" * 300  # the point's folder would be named sample_prompt=xxx...: 314 bytes
    grid = ["--grid", f"train.sample_prompt={prompt},y"]
    assert main(["sweep", str(CPU_CONFIG), *grid, "--launcher", "true", "--out", str(tmp_path / "s")]) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert len(names) == 2 and all(len(n.encode()) <= 255 for n in names) and "sample_prompt=y" in names
    assert main(["sweep", str(CPU_CONFIG), *grid, "--launcher", "true", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == names  # the same names again


def test_launcher_gets_each_point_once_and_is_not_resubmitted(tmp_path, capsys):
    """A launcher that only records its arguments (as sbatch would queue the job): each point is submitted once,
    with the config, the shared and swept --set values and its run dir; a second sweep does not submit again."""
    log = tmp_path / "submitted.txt"
    launcher = tmp_path / "submit.sh"
    launcher.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    launcher.chmod(0o755)
    out = tmp_path / "sweep"
    args = ["sweep", str(CPU_CONFIG), "--grid", "train.lr=1e-3,2e-3", "--set", "train.max_steps=3",
            "--launcher", str(launcher), "--out", str(out)]
    assert main(args) == 0
    lines = log.read_text().splitlines()
    assert lines == [f"{CPU_CONFIG} --set train.max_steps=3 --set train.lr={lr} --run-dir {out / f'lr={lr}'}"
                     for lr in ("1e-3", "2e-3")]
    assert capsys.readouterr().out.count(": submitted") == 2
    assert main(args) == 0
    assert len(log.read_text().splitlines()) == 2  # not submitted twice
    assert "submitted earlier" in capsys.readouterr().out
    assert [r["status"] for r in json.loads((out / "results.json").read_text())] == ["unfinished", "unfinished"]


def test_results_are_rewritten_whole_or_left_as_they_were(tmp_path, monkeypatch):
    from megagpt import sweep

    rows = [{"train.lr": 1e-3, "point": "p0", "status": "done", "val_loss": 2.5}]
    sweep.write_results(rows, tmp_path, ["train.lr"])
    before = (tmp_path / "results.csv").read_bytes()
    assert before.decode().splitlines() == ["train.lr,point,status,val_loss", "0.001,p0,done,2.5"]

    def fail_midway(self, rows):  # a crash while the table is being written (disk full, a kill)
        raise OSError("no space left on device")

    monkeypatch.setattr(sweep.csv.DictWriter, "writerows", fail_midway)
    with pytest.raises(OSError):
        sweep.write_results([{**rows[0], "val_loss": 2.0}], tmp_path, ["train.lr"])
    assert (tmp_path / "results.csv").read_bytes() == before  # not a truncated header
