"""Where a run resumes from, and on a different world size, DeepSpeed's universal checkpoint made for it.

ZeRO partitions optimizer state (and, at stage 3, parameters) by data-parallel rank, so a checkpoint saved on
W ranks only loads as it is on W ranks. When the world size changed, rank 0 converts the tag once with
`deepspeed.checkpoint.ds_to_universal` (in a subprocess: the converter forks worker pools) into
`<tag>_universal/` in this run's own checkpoints/, which this job locks (a `--resume PATH` in another run dir is
only read), and every rank loads that with `"checkpoint": {"load_universal": true}`, a flag the engine must be
built with; hence this runs before the engine exists. Without ZeRO partitions (stage 0 in fp32) every rank's
files hold the full state and load on any world size as they are. After a ZeRO-3 universal load,
`repair_zero3_universal_load` undoes two slips of DeepSpeed's loader (see there and docs/distributed.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megagpt.checkpoint import MANIFEST, TAG_PATTERN, UNIVERSAL_SUFFIX, Checkpointer, tag_for, verify_manifest
from megagpt.dataset import sha256_file
from megagpt.distributed import DistInfo, barrier, on_main, print_once
from megagpt.errors import UserError

DONE = ".megagpt_converted"  # written last, naming the checkpoint converted: a conversion without it is redone


@dataclass(frozen=True)
class ResumePoint:
    checkpointer: Checkpointer  # where the tag is: this run's checkpoints/, or another's (--resume PATH)
    tag: str  # the megagpt checkpoint: manifest, RNG files, DeepSpeed's client state
    load_dir: Path  # what DeepSpeed loads: the tag's dir, or its universal conversion in this run's checkpoints/
    manifest: dict  # the tag's megagpt_manifest.json, as `check` saw it

    @property
    def saved_world_size(self) -> int:
        return int(self.manifest.get("world_size", self.checkpointer.dist.world_size))

    @property
    def universal(self) -> bool:
        return self.load_dir != self.checkpointer.directory / self.tag


def find_resume_point(checkpointer: Checkpointer, resume: str, dist: DistInfo,
                      check: Callable[[dict, str], None] | None = None) -> ResumePoint | None:
    """`auto`: the newest verified tag (None when there is none; NoVerifiedCheckpoint when there are tags but
    none verifies); `never`: None; else a tag dir's path.

    `check(manifest, tag)` may refuse the tag (raise) before anything is converted or written."""
    if resume == "never":
        if checkpointer.tags():  # starting over on top of them would mix two runs' checkpoints and metrics
            raise UserError(f"--resume never: {checkpointer.directory} already holds checkpoints; "
                            f"pass a new --run-dir, or delete that run dir to start over")
        return None
    source = checkpointer  # the run's own, or another run's for --resume PATH: only read
    if resume != "auto":
        path = Path(resume)
        _check_tag_dir(path, resume, checkpointer.directory)
        source = Checkpointer(path.parent, dist)
        problem = on_main(lambda: verify_manifest(path))
        if problem is not None:
            raise UserError(f"--resume {resume}: {problem}")
        tag = path.name
    else:
        choice = on_main(checkpointer.newest_verified)
        refusal = choice.refusal(checkpointer.directory)
        if refusal is not None:  # checkpoints, none of them usable: not a silent start from step 0
            raise refusal
        if choice.tag is None:
            return None
        tag = choice.tag
    manifest = source.read_manifest(tag)
    if check is not None:
        check(manifest, tag)
    point = ResumePoint(source, tag, source.directory / tag, manifest)
    if point.saved_world_size != dist.world_size and is_zero_partitioned(point.load_dir):
        return replace(point, load_dir=convert_to_universal(point.load_dir, checkpointer.directory, dist))
    return point


def _check_tag_dir(path: Path, resume: str, checkpoints: Path) -> None:
    """--resume PATH names an existing checkpoint tag dir (step_NNNNNN), not a typo or a run dir."""
    example = f"pass auto, never, or a checkpoint dir such as {checkpoints / tag_for(500)}"
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such directory; {example}")
    if not TAG_PATTERN.match(path.name):
        raise UserError(f"--resume {resume}: not a checkpoint dir (its name is not step_NNNNNN); {example}")


def convert_to_universal(tag_dir: Path, checkpoints: Path, dist: DistInfo) -> Path:
    """Rank 0 converts `tag_dir` into `checkpoints` (this run's own, which this job locks; never another run
    dir, where a job of its own may be pruning, or a second job converting the same tag) while the others wait.
    Once: a finished conversion of the same checkpoint (its manifest's hash) is reused."""
    out = checkpoints / f"{tag_dir.name}{UNIVERSAL_SUFFIX}"
    if dist.is_main:
        source = sha256_file(tag_dir / MANIFEST)
        done = out / DONE
        if not (done.is_file() and done.read_text().split("\n")[0] == source):  # half-made, or of another tag
            shutil.rmtree(out, ignore_errors=True)
            _run_converter(tag_dir, out, source)
    barrier(slow=True)
    return out


def _run_converter(tag_dir: Path, out: Path, source: str) -> None:
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--inject_missing_state",
           "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    print_once(f"the world size changed since {tag_dir.name}: converting it to a universal checkpoint in {out}")
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir} (exit {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    (out / DONE).write_text(f"{source}\n{tag_dir}, converted in {time.perf_counter() - started:.1f} s\n")


def is_zero_partitioned(tag_dir: Path) -> bool:
    """Whether a checkpoint tag holds per-rank optimizer partitions (ZeRO 1-3, and DeepSpeed's bf16 optimizer):
    then it loads as it is only on its own world size, and its weights need merging for inference."""
    return any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))


def repair_zero3_universal_load(engine, load_dir: Path) -> None:
    """Fix the optimizer state DeepSpeed's ZeRO-3 universal loader leaves (0.19.8, stage3.py,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`); ZeRO 1 and 2 load through another path, unaffected.

    1. It puts one and the same `step` tensor into every sub-group's Adam state. torch's Adam increments that
       tensor in place once per sub-group, so with our two groups (decay, no decay) it went up by 2 a step and
       Adam's bias corrections were those of steps 5, 7, 9 and 6, 8, 10 instead of 5, 6, 7 after a resume
       at step 4 (and the inflated count is saved). Each state gets its own copy here.
    2. It copies param group 0's hyperparameters onto every group, so the no-decay group (norm gains) got
       weight decay 0.1. Each group gets its own back from the checkpoint, as ZeRO 1 and 2 do.
    """
    if engine.zero_optimization_stage() != 3:
        return
    base = engine.optimizer.optimizer  # torch's (or DeepSpeed's) Adam under the ZeRO-3 wrapper
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(load_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise RuntimeError(f"{load_dir}: {len(saved_groups)} optimizer param groups, the model has "
                           f"{len(base.param_groups)}")
    for group, saved_group in zip(base.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
