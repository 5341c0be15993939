"""The training loop: `build_run` wires config, dataset, stage, DeepSpeed engine, checkpoints and logging; `train`
runs the loop. The one place where they meet; what differs between training stages lives in megagpt/stages/."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megagpt.checkpoint import MASTER_NAMES, Checkpointer, step_of
from megagpt.config import (
    CHECKED_KEYS,
    Config,
    ConfigError,
    changes_since,
    model_mismatch,
    save_config,
    with_dtype,
    with_global_batch,
    with_vocab_size,
)
from megagpt.dataset import MANIFEST, Dataset
from megagpt.distributed import DistInfo, device_for, init_distributed, on_main, print_once, warn_once
from megagpt.ds_config import grad_accum_steps
from megagpt.engine import build_engine, master_names
from megagpt.errors import NAME_MAX, UserError, refuse_file_in_the_way
from megagpt.hardware import mfu, peak_flops, resolve_dtype
from megagpt.inference import TOKENIZER_DIR
from megagpt.init_from import loader as init_loader
from megagpt.init_from import resolve as resolve_init_from
from megagpt.lr_schedule import lr_at, stretched_decay
from megagpt.metrics import RunLogger
from megagpt.run_lock import RunLock, lock_run_dir, start_parent_watchdog
from megagpt.signals import StopRequest
from megagpt.stages import build_stage, stage_class
from megagpt.step_guard import StepGuard
from megagpt.throughput import Throughput
from megagpt.universal import ResumePoint, find_resume_point, repair_zero3_universal_load


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0


@dataclass
class RunSummary:
    """What `train` returns: where the run ended. Per-step records are in run_dir/metrics.jsonl."""

    run_dir: Path
    step: int
    tokens_seen: int | None  # None: the run was complete already, nothing was loaded
    skipped_steps: int | None
    val_loss: float | None
    resumed_from: str | None


class RunComplete(Exception):
    """The run dir's resume point is at train.max_steps already: nothing to train, nothing written."""

    def __init__(self, run_dir: Path, tag: str, max_steps: int):
        self.run_dir, self.tag, self.step = run_dir, tag, step_of(tag)
        where = "at" if self.step == max_steps else "past"  # past: max_steps was lowered below the newest tag
        super().__init__(f"{run_dir} is complete: {tag} is {where} train.max_steps ({max_steps}), nothing to train "
                         f"(to train on, raise train.max_steps; to start over, pass a new --run-dir)")


@dataclass
class Run:
    """Everything a training run is made of, built before the first step."""

    cfg: Config
    dist: DistInfo
    run_dir: Path
    dataset: Dataset
    stage: Any
    engine: Any
    checkpointer: Checkpointer
    guard: StepGuard
    log: RunLogger
    state: TrainState
    throughput: Throughput
    resumed_from: str | None
    lock: RunLock | None  # rank 0's: one job per run dir

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint holds beside DeepSpeed's state (see DESIGN.md, "Decisions already taken")."""
        return {**self.stage.state_dict(), "step": self.state.step, "tokens_seen": self.state.tokens_seen,
                "skipped_steps": self.state.skipped_steps, "config": self.cfg.to_dict(),
                "dataset_manifest_sha256": self.dataset.manifest_sha256, "world_size": self.dist.world_size,
                **({MASTER_NAMES: names} if (names := master_names(self.engine)) else {})}

    def save(self) -> None:
        self.guard.check(self.state.step)  # never save a state that too many bad steps in a row produced
        self.state.skipped_steps = self.guard.skipped_steps()
        meta = {"model": {key: getattr(self.cfg.model, key) for key in CHECKED_KEYS},  # checked before any load
                "train": {"dtype": self.cfg.train.dtype,  # read back by _saved_dtype, and by _kept_global_batch:
                          "micro_batch_size": self.cfg.train.micro_batch_size,
                          "global_batch_tokens": self.throughput.tokens_per_step},
                "deepspeed": {"zero_stage": self.cfg.deepspeed.zero_stage}}  # read back by _check_resumable
        with self.throughput.paused():
            self.checkpointer.save(self.engine, self.state.step, self.client_state(), meta)


def train(cfg: Config, run_dir: str | Path | None = None, resume: str = "auto") -> RunSummary:
    """Train until train.max_steps (or a stop signal); resumable from the run dir's checkpoints."""
    try:
        run = build_run(cfg, run_dir, resume)
    except RunComplete as done:
        print_once(str(done))
        return RunSummary(done.run_dir, done.step, None, None, None, done.tag)
    cfg, state = run.cfg, run.state
    stop, val_loss = StopRequest(), None
    last_saved = state.step if run.resumed_from else -1
    try:
        while state.step < cfg.train.max_steps:
            lr = lr_at(state.step, cfg.train)
            for group in run.engine.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # µP: lr/m for hidden matrices (engine.param_groups)
            loss = run.stage.train_step(run.engine, run.guard)  # on the device: read back only when logged
            state.step += 1
            state.tokens_seen += run.throughput.tokens_per_step
            run.throughput.step()
            run.guard.after_update(loss)  # a non-finite loss or gradient norm skipped the update: counted
            last = state.step == cfg.train.max_steps
            if state.step % cfg.train.log_interval == 0 or last:
                _log_train(run, loss, lr)
            if state.step % cfg.train.eval_interval == 0 or last:
                val_loss = _evaluate(run)
            stopping = stop.requested_on_any_rank()
            if state.step % cfg.train.checkpoint_interval == 0 or last or stopping:
                run.save()
                last_saved = state.step
            if stopping:
                run.log.info(f"stop requested ({stop.signal_name}): saved step {state.step}, exiting")
                break
        if last_saved != state.step:
            run.save()
        if state.step == cfg.train.max_steps:
            run.log.info(f"done: {_count(state.step, 'step')}, in {run.run_dir}; next, "
                         + run.stage.next_step.format(run_dir=run.run_dir))
    finally:
        stop.restore()
        run.log.close()
        if run.lock is not None:
            run.lock.release()
    return RunSummary(run.run_dir, state.step, state.tokens_seen, state.skipped_steps, val_loss, run.resumed_from)


def _log_train(run: Run, loss: torch.Tensor, lr: float) -> None:
    """The host reads of the loop: loss, gradient norm, skipped and bad-step counts, once per log interval."""
    run.guard.check(run.state.step)  # too many non-finite steps in a row stop the run
    run.state.skipped_steps = run.guard.skipped_steps()
    loss = loss.item()
    steps, tokens_per_sec = run.throughput.report()
    record = {"loss": loss, "lr": lr, "grad_norm": run.guard.grad_norm(), "tokens_per_sec": tokens_per_sec,
              "tokens_seen": run.state.tokens_seen, "skipped_steps": run.state.skipped_steps, **run.stage.log_stats()}
    # MFU only where the peak is known (a detected GPU or logging.peak_flops): never made up on a CPU.
    peak = peak_flops(run.cfg.train.dtype, run.cfg.logging.peak_flops)
    if peak:  # MFU only where the peak is known
        record["mfu"] = mfu(tokens_per_sec, run.engine.module.flops_per_token(), run.dist.world_size, peak)
    run.log.log(run.state.step, record)
    run.log.progress(steps, loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")


def _evaluate(run: Run) -> float | None:
    """The stage's evaluation and sample, logged; none of it counts as training time."""
    step = run.state.step
    with run.throughput.paused():
        results = run.stage.evaluate(run.engine)
        run.log.log(step, results, section="val")
        if results:
            run.log.info(eval_line(step, results))
        text = run.stage.sample(run.engine, step)
        if text is not None and run.dist.is_main:
            (run.run_dir / "samples").mkdir(exist_ok=True)
            (run.run_dir / "samples" / f"step_{step:06d}.txt").write_text(text)
            run.log.text("samples", text, step)
    return results.get("val_loss")


def eval_line(step: int, results: dict[str, float]) -> str:
    """The console line of an evaluation: `step N: val loss 1.7553`, `step N: val loss 0.3100, accuracy 0.8700`,
    `step N: val loss 0.9665, assistant tokens 7564` (a count as a whole number)."""
    shown = (f"{k.removeprefix('val_').replace('_', ' ')} {int(v) if float(v).is_integer() else f'{v:.4f}'}"
             for k, v in results.items())
    return f"step {step}: val " + ", ".join(shown)


# ---------------------------------------------------------------- building a run


def build_run(cfg: Config, run_dir: str | Path | None = None, resume: str = "auto") -> Run:
    """Decide (dataset, resume point, compatibility) before writing anything, then write and build."""
    dist = init_distributed(cfg.deepspeed.timeout_minutes)
    start_parent_watchdog()  # a launched worker stops within a second of its launcher's death
    run_dir = _usable_run_dir(Path(run_dir) if run_dir else None, cfg.name)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = _open_dataset(cfg)
    cfg, init_source = resolve_init_from(cfg, dataset, run_dir)  # train.init_from: the shape from the source
    cfg = with_vocab_size(cfg, dataset.vocab_size)
    checkpointer = Checkpointer(run_dir / "checkpoints", dist, cfg.train.keep_checkpoints, cfg.train.keep_every)
    lock = lock_run_dir(run_dir, dist)  # one job per run dir, before anything about it is decided
    try:
        checkpointer.refuse_obstacles()
        # Before the engine: a checkpoint from another world size is converted, and the engine built to load it.
        def check(manifest: dict[str, Any], tag: str) -> None:  # refusals before anything is converted
            if step_of(tag) >= cfg.train.max_steps:  # first: a finished run says so on any world size
                raise RunComplete(run_dir, tag, cfg.train.max_steps)
            _check_resumable(cfg, manifest, tag)
            _kept_global_batch(cfg, manifest, tag, dist.world_size)

        point = find_resume_point(checkpointer, resume, dist, check=check)
        if point is not None:
            cfg = _keep_global_batch(cfg, point, dist.world_size)
        cfg = _decide_dtype(cfg, point)
        _check_dtype_on_device(cfg.train.dtype, device_for(dist))
        stage = _stage_for(cfg, dist, dataset)  # its refusals (data of another kind, no init_from) come here
    except BaseException:
        if lock is not None:
            lock.release(undo=True)  # refused: the run dir is left byte-identical
        raise
    try:
        return _build(cfg, dist, run_dir, dataset, checkpointer, point, lock, stage, init_source)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _stage_for(cfg: Config, dist: DistInfo, dataset: Dataset):
    """cfg.train.stage's training stage, on this rank's device."""
    accum = grad_accum_steps(cfg.train, cfg.model.block_size, dist.world_size)
    return build_stage(cfg.train.stage, cfg=cfg, dataset=dataset, dist=dist, device=device_for(dist),
                       grad_accum_steps=accum)


def _build(cfg: Config, dist: DistInfo, run_dir: Path, dataset: Dataset, checkpointer: Checkpointer,
           point: ResumePoint | None, lock: RunLock | None, stage, init_source=None) -> Run:
    """What build_run does once it has decided to run: write the run dir, build, load the resume point."""
    notes = _resume_notes(run_dir / "config.yaml", cfg, step_of(point.tag)) if point and dist.is_main else []
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        dataset.copy_tokenizer_to(run_dir / TOKENIZER_DIR)
    device = device_for(dist)
    build_model = stage.build_model  # weights from train.init_from only when not resuming the run's own checkpoint
    if init_source is not None and point is None:
        build_model = init_loader(stage.build_model, source=init_source)
    engine = build_engine(cfg, dist, build_model, load_universal=point is not None and point.universal)
    state = TrainState()
    resumed_from = _resume(engine, point, stage, state, cfg, dataset)
    log = RunLogger(run_dir, dist.is_main, state.step, cfg.train.max_steps, cfg.logging.tensorboard,
                    cfg.logging.progress_bar)
    if resumed_from:
        log.info(f"resumed from {resumed_from} at step {state.step}")
    elif init_source is not None:
        log.info(f"weights from {init_source.describe()}")
    for note in notes:
        log.info(note)
    if device.type == "cuda" and "triton" in (cfg.model.attention, cfg.model.norm):
        pause = "under a minute" if cfg.model.kernel_tuning == "pruned" else "minutes with kernel_tuning: full"
        log.info(f"the first step may pause while the Triton kernels autotune ({pause} the first time on a "
                 "machine; the choices are then cached on disk)")
    tokens_per_step = cfg.train.micro_batch_size * stage.grad_accum_steps * dist.world_size * cfg.model.block_size
    guard = StepGuard(engine, cfg.train.max_bad_steps, cfg.train.dtype == "fp16", device, state.skipped_steps,
                      grad_clip=cfg.train.grad_clip)
    return Run(cfg, dist, run_dir, dataset, stage, engine, checkpointer, guard, log, state,
               Throughput(tokens_per_step), resumed_from, lock)


def _resume_notes(saved: Path, cfg: Config, step: int) -> list[str]:
    """What a resume changes against the run's config.yaml (read before it is rewritten), one line each."""
    changed = changes_since(saved, cfg)
    if not changed:
        return []
    shown = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:5]]
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    notes = [f"settings changed since the run's last start: {'; '.join(shown)}{more}"]
    if "train.max_steps" in changed and "train.lr_decay_steps" not in changed:
        stretched = stretched_decay(changed["train.max_steps"][0], cfg.train, step)
        notes += [stretched] if stretched else []
    return notes


def _usable_run_dir(run_dir: Path | None, name: str) -> Path:
    """--run-dir (default runs/<name>), refused in one line when no directory can be made there: a name longer
    than a file system takes (NAME_MAX, 255 bytes on Linux's), or a file in its place or above it."""
    shown = name if len(name) <= 40 else name[:40] + "..."
    flag = f"--run-dir {run_dir}" if run_dir else f"the run dir runs/<name> (name: {shown!r})"
    run_dir = run_dir or Path("runs") / name
    too_long = next((part for part in run_dir.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long is not None:
        raise UserError(f"{flag}: a name of {len(os.fsencode(too_long))} bytes ({too_long[:20]!r}...), over the "
                        f"{NAME_MAX} a file system takes; choose a shorter one")
    refuse_file_in_the_way(run_dir, flag, "pass a directory")
    return run_dir


def _open_dataset(cfg: Config) -> Dataset:
    directory = Path(cfg.data.dataset_dir)
    if not (directory / MANIFEST).is_file():
        how = stage_class(cfg.train.stage).prepare_data.format(dir=directory)  # the kind of data the stage reads
        raise ConfigError(f"data.dataset_dir: {directory} has no {MANIFEST}; prepare it first with {how}")
    return Dataset(directory)


# DeepSpeed's checkpoint files by ZeRO stage: 1 and 2 write and read the same ones; 0 (no optimizer partitions)
# and 3 (partitioned weights too) each their own, and loading another's fails inside DeepSpeed.
ZERO_LAYOUTS = {0: "unpartitioned", 1: "optimizer partitions", 2: "optimizer partitions", 3: "weight partitions"}


def _check_resumable(cfg: Config, manifest: dict[str, Any], tag: str) -> None:
    """The checkpoint's model keys, dtype and ZeRO layout match the config's (µP keys a checkpoint predates count
    as the defaults; a checkpoint from before dtypes or ZeRO stages were recorded is not checked for one)."""
    mismatch = model_mismatch(cfg.model, manifest.get("model", {}))
    if mismatch is not None:
        key, value, saved = mismatch
        origin = (f" (set, or else the vocabulary of data.dataset_dir={cfg.data.dataset_dir})"
                  if key == "vocab_size" else "")
        raise ConfigError(
            f"model.{key}={value!r}{origin} but checkpoint {tag} was trained with "
            f"{saved!r}: resume with the same model and data, or start a new --run-dir"
        )
    saved_dtype = _saved_dtype(manifest) or cfg.train.dtype
    if cfg.train.dtype != "auto" and saved_dtype != cfg.train.dtype:  # DeepSpeed's optimizer state differs
        raise ConfigError(
            f"train.dtype={cfg.train.dtype!r} but checkpoint {tag} was trained in {saved_dtype!r}: resume with "
            f"--set train.dtype={saved_dtype}, or start a new --run-dir with --set train.init_from=RUN_DIR"
        )
    saved_zero = manifest.get("deepspeed", {}).get("zero_stage", cfg.deepspeed.zero_stage)
    if ZERO_LAYOUTS[saved_zero] != ZERO_LAYOUTS[cfg.deepspeed.zero_stage]:  # DeepSpeed's loader fails mid-build
        raise ConfigError(
            f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} but checkpoint {tag} was saved under ZeRO "
            f"{saved_zero}, whose files that stage cannot load: resume with --set deepspeed.zero_stage={saved_zero}"
            f"{' (or 2)' if saved_zero == 1 else ' (or 1)' if saved_zero == 2 else ''}, or start a new --run-dir "
            f"with --set train.init_from=RUN_DIR"
        )


def _kept_global_batch(cfg: Config, manifest: dict[str, Any], tag: str, world_size: int) -> int | None:
    """The global batch in tokens a resumed run must set to go on with the one its checkpoint was trained with,
    where the config fixes only the per-rank batch and the world size changed it (now or at an earlier resume);
    None: nothing to set (the config fixes it, or the per-rank batch was changed on purpose). A ConfigError when
    this world size cannot make it up."""
    if cfg.train.global_batch_tokens is not None:
        return None  # global_batch_tokens fixes the step on any number of ranks
    t, block = cfg.train, cfg.model.block_size
    saved_train = manifest.get("train", {})
    if "global_batch_tokens" in saved_train:
        if saved_train.get("micro_batch_size") != t.micro_batch_size:
            return None  # a new per-rank batch, on purpose: the global batch changes with it
        saved = saved_train["global_batch_tokens"]
    else:  # saved before manifests recorded it: what this config made on the saved world size
        saved_world = int(manifest.get("world_size", world_size))
        saved = t.micro_batch_size * block * saved_world * grad_accum_steps(t, block, saved_world)
    per_pass = t.micro_batch_size * block * world_size
    if saved == per_pass * grad_accum_steps(t, block, world_size):
        return None
    if saved % per_pass:
        raise ConfigError(
            f"checkpoint {tag} was trained with a global batch of {saved} tokens, which "
            f"{_count(world_size, 'rank')} of micro_batch_size × block_size = {t.micro_batch_size * block} cannot "
            f"make up: set train.micro_batch_size so that they can, or --set train.global_batch_tokens=N to change "
            f"the batch")
    return saved


def _keep_global_batch(cfg: Config, point: ResumePoint, world_size: int) -> Config:
    """cfg with the saved global batch made explicit (train.global_batch_tokens; accumulation follows from it)."""
    tokens = _kept_global_batch(cfg, point.manifest, point.tag, world_size)
    if tokens is None:
        return cfg
    print_once(f"the global batch stays at {tokens} tokens, as {point.tag} was trained with: "
               f"train.global_batch_tokens={tokens}")
    return with_global_batch(cfg, tokens)


def _saved_dtype(manifest: dict[str, Any]) -> str | None:
    """The dtype a checkpoint was trained in (None: saved before manifests recorded it)."""
    return manifest.get("train", {}).get("dtype")


def _decide_dtype(cfg: Config, point: ResumePoint | None) -> Config:
    """train.dtype `auto` decided once per run: a resumed run keeps the dtype its checkpoint was trained in; a
    new one (or a checkpoint from before manifests recorded the dtype) takes rank 0's hardware's (bf16 where
    native, else fp32), the same on every rank."""
    if cfg.train.dtype != "auto":
        return cfg
    saved = _saved_dtype(point.manifest) if point is not None else None
    return with_dtype(cfg, saved or on_main(lambda: resolve_dtype("auto")))


def _check_dtype_on_device(dtype: str, device: torch.device) -> None:
    """fp16 trains only on a GPU: DeepSpeed's loss-scaled fp16 has no CPU path."""
    if dtype == "fp16" and device.type != "cuda":
        raise ConfigError("train.dtype: fp16 needs a CUDA GPU (DeepSpeed's fp16 has no CPU path); on a CPU use "
                          "fp32, bf16 or auto")


def _resume(engine, point: ResumePoint | None, stage, state: TrainState, cfg: Config,
            dataset: Dataset) -> str | None:
    """Load the resume point's weights, optimizer, RNG and data position; a description of it, or None."""
    if point is None:
        return None
    checkpointer, tag = point.checkpointer, point.tag
    client = checkpointer.load(engine, tag, point.load_dir, seed=cfg.train.seed)
    if point.universal:
        repair_zero3_universal_load(engine, point.load_dir)
    if client.get("dataset_manifest_sha256") != dataset.manifest_sha256:
        warn_once(f"the dataset in {dataset.dir} differs from the one checkpoint {tag} was trained on")
    state.step, state.tokens_seen = client["step"], client["tokens_seen"]
    state.skipped_steps = client.get("skipped_steps", 0)
    stage.load_state_dict(client)
    if point.universal:
        return (f"{tag} (saved on {_count(point.saved_world_size, 'rank')}, loaded on "
                f"{_count(checkpointer.dist.world_size, 'rank')} via {point.load_dir.name})")
    return tag


def _count(n: int, noun: str) -> str:
    """'1 rank', '2 ranks'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
