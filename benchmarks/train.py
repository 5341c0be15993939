"""`megagpt bench train`: megagpt's training throughput on a config, alone or side by side with nanoGPT itself.

With `--against PATH` (a nanoGPT checkout), both run as whole processes on the same model, batch and data
(Tiny Shakespeare, char level), interleaved A B A B ..., and each run's median step time after `--skip` steps
is taken from its own log: nanoGPT's per-iteration `time ...ms` lines, megagpt's metrics.jsonl (log_interval 1).
Each side's dtype is printed beside its time: megagpt's is the config's (`auto`: bf16 on a CPU with native bf16,
else fp32); nanoGPT's train.py trains in fp32 on any CPU (its autocast context is CUDA-only).
nanoGPT runs unchanged from a temporary copy of PATH (its data prepared there by its own prepare.py, from the
Tiny Shakespeare megagpt ships: nothing is downloaded or written into PATH).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megagpt.config import Config, load_config
from megagpt.ds_config import grad_accum_steps
from megagpt.errors import UserError
from megagpt.files import write_whole
from megagpt.metrics import read_metrics

NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt bench train", description=__doc__)
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=400, help="steps per run")
    p.add_argument("--skip", type=int, default=100, help="steps left out of the median (start-up, warm-up)")
    p.add_argument("--against", metavar="NANOGPT_DIR", help="a nanoGPT checkout to run side by side")
    p.add_argument("--rounds", type=int, default=None, help="A B pairs (with --against; default 3)")
    p.add_argument("--json", dest="json_out", help="write the results here")
    args = p.parse_args(argv)
    if args.rounds is not None and not args.against:
        raise UserError(f"--rounds {args.rounds}: counts A B pairs with --against; alone, megagpt runs once")
    args.rounds = 3 if args.rounds is None else args.rounds
    check_counts(args.steps, args.skip, args.rounds)
    json_out = None if args.json_out is None else check_json_out(Path(args.json_out))
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="megagpt-bench-train-") as work:
        work = Path(work)
        nanogpt = prepare_nanogpt(Path(args.against), work / "nanogpt") if args.against else None
        rounds = []
        for _ in range(args.rounds if nanogpt else 1):
            row = {"megagpt": run_megagpt(args.config, args.overrides, args.steps, args.skip, work)}
            if nanogpt:
                row["nanogpt"] = run_nanogpt(nanogpt, cfg, args.steps, args.skip)
            rounds.append(row)
            print("  ".join(f"{k} {v:.2f} ms/step" for k, v in row.items()), flush=True)
        dtypes = {"megagpt": trained_dtype(work / RUN_DIR), **({"nanogpt": "fp32"} if nanogpt else {})}
    results = {**summarise(rounds, tokens_per_step(cfg)), "dtypes": dtypes}
    _print(results)
    if json_out is not None:
        write_whole(json_out, json.dumps(results, indent=1) + "\n")
    return 0


def check_counts(steps: int, skip: int, rounds: int) -> None:
    """--steps, --skip and --rounds refused before any run when they leave no step to time."""
    if skip < 0 or rounds < 1:
        raise UserError(f"--skip {skip} --rounds {rounds}: --skip must be at least 0, --rounds at least 1")
    if skip >= steps:
        raise UserError(f"--skip {skip} must be smaller than --steps {steps}")


def check_json_out(path: Path) -> Path:
    """--json's file, refused before the runs (minutes) when it could not be written after them."""
    if path.is_dir():
        raise UserError(f"--json {path}: is a folder; give a file name, e.g. {path / 'bench_train.json'}")
    if not path.parent.is_dir():
        raise UserError(f"--json {path}: {path.parent} is not a folder; make it first")
    return path


def summarise(rounds: list[dict[str, float]], tokens_per_step: int) -> dict:
    """Medians over rounds of each run's median step time; with nanoGPT, the ratio pair by pair and of medians."""
    names = list(rounds[0])
    out = {"rounds": rounds, "tokens_per_step": tokens_per_step}
    for name in names:
        ms = statistics.median(r[name] for r in rounds)
        out[name] = {"ms_per_step": ms, "tokens_per_sec": tokens_per_step / ms * 1000}
    if "nanogpt" in names:
        out["speedup_pairs"] = [r["nanogpt"] / r["megagpt"] for r in rounds]
        out["speedup"] = out["nanogpt"]["ms_per_step"] / out["megagpt"]["ms_per_step"]
    return out


def _print(results: dict) -> None:
    for name in ("megagpt", "nanogpt"):
        if name in results:
            r = results[name]
            print(f"{name:8s} {r['ms_per_step']:8.2f} ms/step  {r['tokens_per_sec']:>10,.0f} tokens/s  (median)  "
                  f"{results['dtypes'][name]}")
    if "speedup" in results:
        pairs = ", ".join(f"{x:.3f}" for x in results["speedup_pairs"])
        print(f"megagpt / nanoGPT tokens/s: {results['speedup']:.3f} (pairs: {pairs})")


def tokens_per_step(cfg: Config) -> int:
    """Tokens in one optimizer step of the single-process run, every accumulated micro-batch counted."""
    return cfg.train.micro_batch_size * _accum(cfg) * cfg.model.block_size


def _accum(cfg: Config) -> int:
    """Micro-batches per step: train.grad_accum_steps, or what train.global_batch_tokens gives on one process."""
    return grad_accum_steps(cfg.train, cfg.model.block_size, world_size=1)


# ---------------------------------------------------------------- megagpt


RUN_DIR = "megagpt-run"  # in the work dir; each round's run replaces the one before


def run_megagpt(config: str, overrides: list[str], steps: int, skip: int, work: Path) -> float:
    """`megagpt train` as a whole process; its median ms/step after `skip` from metrics.jsonl."""
    run_dir = work / RUN_DIR
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [*overrides, f"train.max_steps={steps}", "train.log_interval=1", "logging.progress_bar=false",
            "logging.tensorboard=false", f"train.checkpoint_interval={steps}"]
    cmd = [sys.executable, "-m", "megagpt", "train", config, *[a for s in sets for a in ("--set", s)],
           "--run-dir", str(run_dir)]
    _run(cmd, work / "megagpt.log")
    records = [r for r in read_metrics(run_dir) if "tokens_per_sec" in r and r["step"] > skip]
    tokens_per_step = records[0]["tokens_seen"] // records[0]["step"]
    return statistics.median(1000 * tokens_per_step / r["tokens_per_sec"] for r in records)


def trained_dtype(run_dir: Path) -> str:
    """The dtype a megagpt run trained in: its config.yaml's train.dtype, `auto` resolved for this machine."""
    return load_config(run_dir / "config.yaml").train.dtype


# ---------------------------------------------------------------- nanoGPT


def prepare_nanogpt(source: Path, dest: Path) -> Path:
    """A copy of the nanoGPT checkout with data/shakespeare_char prepared by its own prepare.py."""
    if not (source / "train.py").is_file() or not (source / "data" / "shakespeare_char" / "prepare.py").is_file():
        raise UserError(f"--against {source}: not a nanoGPT checkout (no train.py, data/shakespeare_char/prepare.py)")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl"))
    from data_prep.shakespeare import check_embedded, embedded_copy

    check_embedded(embedded_copy())
    data = dest / "data" / "shakespeare_char"
    (data / "input.txt").write_bytes(gzip.decompress(embedded_copy().read_bytes()))
    # prepare.py imports requests for a download it skips when input.txt exists: an empty stand-in suffices
    (dest / "_stubs").mkdir()
    (dest / "_stubs" / "requests.py").write_text('"""Unused: input.txt is already there."""\n')
    _run([sys.executable, "prepare.py"], dest / "prepare.log", cwd=data, pythonpath=dest / "_stubs")
    return dest


def nanogpt_args(cfg: Config, steps: int, out_dir: Path) -> list[str]:
    """nanoGPT's README CPU command, with the model, batch and schedule of megagpt's config."""
    m, t = cfg.model, cfg.train
    return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", f"--out_dir={out_dir}",
            f"--eval_iters={t.eval_steps}", f"--eval_interval={t.eval_interval}", "--log_interval=1",
            f"--block_size={m.block_size}", f"--batch_size={t.micro_batch_size}",
            f"--gradient_accumulation_steps={_accum(cfg)}", f"--n_layer={m.n_layer}",
            f"--n_head={m.n_head}", f"--n_embd={m.n_embd}", f"--dropout={m.dropout}", f"--bias={m.bias}",
            f"--max_iters={steps}", f"--lr_decay_iters={t.lr_decay_steps or t.max_steps}",
            f"--learning_rate={t.lr}", f"--min_lr={t.min_lr}", f"--warmup_iters={t.warmup_steps}",
            f"--beta2={t.beta2}", f"--weight_decay={t.weight_decay}", f"--grad_clip={t.grad_clip}"]


def run_nanogpt(nanogpt: Path, cfg: Config, steps: int, skip: int) -> float:
    """nanoGPT's train.py as a whole process; its median ms/iteration after `skip` from its own log."""
    out_dir = nanogpt / "out-bench"
    shutil.rmtree(out_dir, ignore_errors=True)
    log = _run([sys.executable, "train.py", *nanogpt_args(cfg, steps, out_dir)], nanogpt / "train.log",
               cwd=nanogpt)
    times = [float(m.group(2)) for line in log.splitlines() if (m := NANOGPT_ITER.match(line))
             and int(m.group(1)) > skip]
    if not times:
        raise UserError(f"{nanogpt / 'train.log'}: no `iter N: ... time ...ms` lines after iter {skip}")
    return statistics.median(times)


def _run(cmd: list[str], log: Path, cwd: Path | None = None, pythonpath: Path | None = None) -> str:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-1500:]
        raise UserError(f"{' '.join(cmd[:4])} ... failed (exit {result.returncode}); log {log}:\n{tail}")
    return result.stdout + result.stderr
