"""`megagpt bench syncs`: device->host reads of the training loop, per step, by where they happen.

A read is aten::_local_scalar_dense (what .item(), float(t), bool(t), int(t) of a tensor run). The loop's parts
are labelled with profiler ranges (a step, a logged step, an evaluation, a checkpoint); reads inside torch's
optimizer step are told apart, since on a CPU torch's fused AdamW reads its CPU-side step counters (on a GPU it
keeps them on the device). megagpt's own reads are those of logged steps, evaluations and checkpoints; reads in a
plain step are DeepSpeed's (its ZeRO 1-3 and bf16/fp16 optimizers check for overflow on the host).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import sys
import tempfile

import torch

from megagpt.config import Config, ConfigError, load_config
from megagpt.errors import UserError

SYNC = "aten::_local_scalar_dense"
PARTS = ("log", "save", "evaluate")  # megagpt's own reads happen only in these


@contextlib.contextmanager
def _labelled(owner, name: str, label: str):
    """owner.name runs inside a profiler range named label (undone on exit)."""
    own, original = name in vars(owner), getattr(owner, name)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def host_reads(cfg, run_dir) -> dict[str, int]:
    """Reads after the first step began: in a logged step, an evaluation, a checkpoint, torch's optimizer, or
    elsewhere in a step; plus the number of steps."""
    import megagpt.train as trainer

    with contextlib.ExitStack() as patches:
        patches.enter_context(_labelled(_stage_class(cfg.train.stage), "train_step", "megagpt.step"))
        patches.enter_context(_labelled(trainer, "_log_train", "megagpt.log"))
        patches.enter_context(_labelled(trainer.Run, "save", "megagpt.save"))
        patches.enter_context(_labelled(trainer, "_evaluate", "megagpt.evaluate"))
        said = patches.enter_context(contextlib.redirect_stdout(io.StringIO()))  # the run's lines: not the table's
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                trainer.train(cfg, run_dir)
        except BaseException:
            sys.stderr.write(said.getvalue())  # what the run said before it failed
            raise
    return _attribute(prof.events())


def _stage_class(stage: str) -> type:
    from megagpt.stages import STAGES

    module_name, class_name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _attribute(events) -> dict[str, int]:
    spans = {part: [e.time_range for e in events if e.name == f"megagpt.{part}"] for part in ("step", *PARTS)}
    loop_start = min(r.start for r in spans["step"])
    counts = {"steps": len(spans["step"]), **dict.fromkeys(PARTS, 0), "optimizer": 0, "step": 0}
    for event in (e for e in events if e.name == SYNC and e.time_range.start >= loop_start):
        where = next((p for p in PARTS if any(r.start <= event.time_range.start <= r.end for r in spans[p])),
                     "optimizer" if _in_optimizer(event) else "step")
        counts[where] += 1
    return counts


def _in_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step#"):
            return True
        parent = parent.cpu_parent
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt bench syncs", description=__doc__)
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--zero-stages", default="0,1,2,3")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args(argv)
    runs = configs(args)  # every one checked before the first run (each a training)
    print(f"{'zero':>4} {'dtype':>6} {'steps':>6} {'in a step':>10} {'optimizer':>10} {'logged':>7} "
          f"{'evaluate':>9} {'save':>5}   (reads; 'in a step' and 'optimizer' per step)")
    for zero, dtype, cfg in runs:
        with tempfile.TemporaryDirectory() as run_dir:
            c = host_reads(cfg, run_dir)
        print(f"{zero:>4} {dtype:>6} {c['steps']:>6} {c['step'] / c['steps']:>10.1f} "
              f"{c['optimizer'] / c['steps']:>10.1f} {c['log']:>7} {c['evaluate']:>9} {c['save']:>5}", flush=True)
    return 0


def configs(args) -> list[tuple[str, str, Config]]:
    """(zero stage, dtype, config) of each run, a bad --steps, --zero-stages or --dtypes named before any run."""
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    load_config(args.config, args.overrides)  # the config's own mistakes, named as such
    runs = []
    for zero, dtype in itertools.product(args.zero_stages.split(","), args.dtypes.split(",")):
        quiet = [f"deepspeed.zero_stage={zero}", f"train.dtype={dtype}", f"train.max_steps={args.steps}",
                 f"train.log_interval={args.steps}", f"train.eval_interval={10 * args.steps}",
                 f"train.checkpoint_interval={10 * args.steps}", "train.sample_tokens=0", "train.eval_steps=1",
                 "logging.progress_bar=false", "logging.tensorboard=false"]
        try:
            runs.append((zero, dtype, load_config(args.config, [*args.overrides, *quiet])))
        except ConfigError as e:
            raise UserError(f"--zero-stages {args.zero_stages} --dtypes {args.dtypes}: {zero!r}, {dtype!r}: "
                            f"{str(e).split(': ', 1)[-1]}") from None
    return runs
