"""The training loop: the one place where config, data, model, DeepSpeed engine, checkpoints and logging meet."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megagpt.checkpoint import Checkpointer
from megagpt.config import Config, ConfigError, save_config
from megagpt.distributed import DistInfo, barrier, device_for, init_distributed
from megagpt.ds_config import deepspeed_config, grad_accum_steps
from megagpt.generate import generate
from megagpt.hardware import mfu, peak_flops
from megagpt.inference import TOKENIZER_DIR, copy_tokenizer
from megagpt.lr_schedule import lr_at
from megagpt.metrics import RunLogger
from megagpt.model import GPT
from megagpt.signals import StopRequest
from megagpt.step_guard import StepGuard
from megagpt.universal import ResumePoint, find_resume_point, repair_zero3_universal_load

# Model keys that change parameter shapes: a checkpoint only resumes into a model that agrees on all of them.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # what was logged, for callers and tests


def train(cfg: Config, run_dir: str | Path | None = None, resume: str = "auto") -> TrainState:
    dist = init_distributed(cfg.deepspeed.timeout_minutes)
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    dataset_dir = prepare_dataset(cfg, dist)
    from megagpt.data import TrainLoader, load_manifest
    from megagpt.tokenizer import load_tokenizer

    manifest = load_manifest(dataset_dir)
    cfg = _with_vocab(cfg, manifest)
    tokenizer = load_tokenizer(dataset_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        copy_tokenizer(dataset_dir, run_dir / TOKENIZER_DIR)

    checkpointer = Checkpointer(
        run_dir / "checkpoints", dist, cfg.train.keep_checkpoints, cfg.train.keep_every
    )
    # Before the engine: a checkpoint from another world size is converted, and the engine built to load it.
    resume_point = find_resume_point(checkpointer, resume, dist)
    engine = build_engine(cfg, dist, load_universal=resume_point is not None and resume_point.universal)
    device = device_for(dist)
    accum = grad_accum_steps(cfg.train, cfg.model.block_size, dist.world_size)
    loader = TrainLoader(
        dataset_dir,
        cfg.model.block_size,
        cfg.train.micro_batch_size,
        accum,
        dist.rank,
        dist.world_size,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        on_corrupt_shard=cfg.data.on_corrupt_shard,
    )
    state = TrainState()
    manifest_hash = hashlib.sha256((Path(dataset_dir) / "manifest.json").read_bytes()).hexdigest()
    resumed_from = _resume(engine, resume_point, loader, state, cfg, manifest_hash)
    guard = StepGuard(engine, cfg.train.max_bad_steps, fp16=cfg.train.dtype == "fp16")

    log = RunLogger(
        run_dir,
        dist.is_main,
        state.step,
        cfg.train.max_steps,
        cfg.logging.tensorboard,
        cfg.logging.progress_bar,
    )
    if resumed_from:
        log.info(f"resumed from {resumed_from} at step {state.step}")
    if device.type == "cuda" and "triton" in (cfg.model.attention, cfg.model.norm):
        log.info("the first step may pause while the Triton kernels autotune (minutes the first time on a "
                 "machine; the choices are then cached on disk)")
    tokens_per_step = cfg.train.micro_batch_size * accum * dist.world_size * cfg.model.block_size
    # MFU only where the peak is known (a detected GPU or logging.peak_flops): never made up on a CPU.
    peak = peak_flops(cfg.train.dtype, cfg.logging.peak_flops)
    flops_per_token = engine.module.flops_per_token()
    stop = StopRequest()
    batches = iter(loader)

    def client_state() -> dict[str, Any]:
        return {
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "skipped_steps": state.skipped_steps,
            "loader": loader.state_dict(),
            "config": cfg.to_dict(),
            "dataset_manifest_sha256": manifest_hash,
            "world_size": dist.world_size,
        }

    meta = {"model": {key: getattr(cfg.model, key) for key in SHAPE_KEYS}}  # checked before any load
    last_saved = state.step if resumed_from else -1
    window_start, window_steps = time.perf_counter(), 0
    try:
        while state.step < cfg.train.max_steps:
            lr = lr_at(state.step, cfg.train)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(engine, batches, accum, device, guard)
            state.step += 1
            state.tokens_seen += tokens_per_step
            window_steps += 1
            # A non-finite loss or gradient norm (or an fp16 overflow) skipped the update; many in a row stop.
            state.skipped_steps += guard.after_update(loss, state.step)
            state.bad_steps_in_row = guard.bad_in_row

            if state.step % cfg.train.log_interval == 0 or state.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": guard.grad_norm(),
                    "tokens_per_sec": window_steps * tokens_per_step / max(elapsed, 1e-9),
                    "tokens_seen": state.tokens_seen,
                    "skipped_steps": state.skipped_steps,
                }
                utilisation = mfu(record["tokens_per_sec"], flops_per_token, dist.world_size, peak)
                if utilisation is not None:
                    record["mfu"] = utilisation
                log.log(state.step, record)
                state.history.append({"step": state.step, **record})
                log.progress(window_steps, loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_sec']:,.0f}")
                window_start, window_steps = time.perf_counter(), 0

            if state.step % cfg.train.eval_interval == 0 or state.step == cfg.train.max_steps:
                val_loss = evaluate(engine, dataset_dir, cfg, dist, device)
                log.log(state.step, {"val_loss": val_loss}, section="val")
                state.history.append({"step": state.step, "val_loss": val_loss})
                log.info(f"step {state.step}: val loss {val_loss:.4f}")
                _write_sample(engine, tokenizer, cfg, dist, device, run_dir, log, state.step)
                window_start = time.perf_counter()  # evaluation time is not training throughput

            stopping = stop.requested_on_any_rank()
            if (
                state.step % cfg.train.checkpoint_interval == 0
                or state.step == cfg.train.max_steps
                or stopping
            ):
                checkpointer.save(engine, state.step, client_state(), meta)
                last_saved = state.step
                window_start = time.perf_counter()
            if stopping:
                log.info(f"stop requested ({stop.signal_name}): saved step {state.step}, exiting")
                break
        if last_saved != state.step:
            checkpointer.save(engine, state.step, client_state(), meta)
    finally:
        stop.restore()
        log.close()
    return state


def train_step(engine, batches, accum: int, device: torch.device, guard: StepGuard) -> float:
    """One optimizer step over `accum` micro-batches; returns the loss averaged over micro-batches and ranks."""
    total = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = next(batches)
        _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        engine.backward(guard.watch(loss))
        if micro == accum - 1:
            guard.before_update()
        engine.step()  # only the last micro-batch's call updates the weights
        total += loss.detach().float()
    total /= accum
    return _mean_over_ranks(total)


def _mean_over_ranks(value: torch.Tensor) -> float:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)  # SUM: gloo has no AVG
        value = value / torch.distributed.get_world_size()
    return value.item()


@torch.no_grad()
def evaluate(engine, dataset_dir, cfg: Config, dist: DistInfo, device: torch.device) -> float:
    from megagpt.data import eval_batches

    engine.eval()
    losses = [
        engine(x.to(device), y.to(device))[1].float()
        for x, y in eval_batches(
            dataset_dir,
            "val",
            cfg.model.block_size,
            cfg.train.micro_batch_size,
            cfg.train.eval_steps,
            dist.rank,
            dist.world_size,
        )
    ]
    engine.train()
    return _mean_over_ranks(torch.stack(losses).mean())


def build_engine(cfg: Config, dist: DistInfo, load_universal: bool = False):
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = GPT(cfg.model)
    torch.manual_seed(cfg.train.seed + dist.rank)  # but a different dropout stream per rank
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    ds_config = deepspeed_config(cfg, dist.world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if cfg.train.compile:
        engine.compile()
    return engine


def prepare_dataset(cfg: Config, dist: DistInfo) -> Path:
    """The config's dataset dir; prepared by rank 0 first when it is missing and the config says how."""
    dataset_dir = Path(cfg.data.dataset_dir)
    if not (dataset_dir / "manifest.json").is_file():
        if cfg.data.prepare == "none":
            raise ConfigError(
                f"data.dataset_dir: {dataset_dir} has no manifest.json; prepare it first with "
                f"`megagpt prep {{char,sentencepiece}} --input CORPUS --out {dataset_dir}` "
                f"(or set data.prepare=shakespeare for Tiny Shakespeare)"
            )
        if dist.is_main:
            import data_prep

            data_prep.prepare_shakespeare(dataset_dir, cfg.data.source)
        barrier()
    return dataset_dir


def _with_vocab(cfg: Config, manifest: dict[str, Any]) -> Config:
    vocab = int(manifest["vocab_size"])
    if cfg.model.vocab_size is None:
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": vocab})})
    if cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the dataset's vocabulary ({vocab})"
        )
    return cfg


def _resume(
    engine, point: ResumePoint | None, loader, state: TrainState, cfg: Config, manifest_hash: str
) -> str | None:
    if point is None:
        return None
    checkpointer, tag = point.checkpointer, point.tag
    saved_model = checkpointer.read_manifest(tag).get("model", {})
    for key in SHAPE_KEYS:
        if saved_model.get(key) != getattr(cfg.model, key):
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)!r} but checkpoint {tag} was trained with "
                f"{saved_model.get(key)!r}: resume with the same model shape or start a new --run-dir"
            )
    client = checkpointer.load(engine, tag, point.load_tag, seed=cfg.train.seed)
    if point.universal:
        repair_zero3_universal_load(engine, checkpointer.directory / point.load_tag)
    if client.get("dataset_manifest_sha256") != manifest_hash:
        import warnings

        warnings.warn(
            f"the dataset in {cfg.data.dataset_dir} differs from the one checkpoint {tag} was trained on",
            stacklevel=2,
        )
    state.step, state.tokens_seen = client["step"], client["tokens_seen"]
    state.skipped_steps = client.get("skipped_steps", 0)
    loader.load_state_dict(client["loader"])  # global positions: valid on any world size
    if point.universal:
        return (
            f"{tag} (saved on {point.saved_world_size} ranks, loaded on {checkpointer.dist.world_size} "
            f"via {point.load_tag})"
        )
    return tag


def _write_sample(
    engine, tokenizer, cfg: Config, dist: DistInfo, device, run_dir: Path, log: RunLogger, step: int
):
    """A short sample at each evaluation; every rank runs it (ZeRO-3 needs all of them), rank 0 writes it."""
    if cfg.train.sample_tokens == 0:
        return
    prompt = tokenizer.encode(cfg.train.sample_prompt) or [0]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(
        cfg.train.seed + step
    )  # leaves training RNG untouched
    out = generate(
        engine.module, idx, cfg.train.sample_tokens, temperature=0.8, top_k=200, generator=generator
    )
    engine.module.train()
    if dist.is_main:
        text = tokenizer.decode(out[0].tolist())
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "samples" / f"step_{step:06d}.txt").write_text(text)
        log.text("samples", text, step)
