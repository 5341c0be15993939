"""The DeepSpeed config dict, generated from megagpt's config (never a second hand-kept file)."""

from __future__ import annotations

from typing import Any

from megagpt.config import Config, ConfigError, TrainConfig, deep_merge


def grad_accum_steps(train: TrainConfig, block_size: int, world_size: int) -> int:
    """Explicit `train.grad_accum_steps`, else global_batch_tokens ÷ (micro batch × block × world size), else 1."""
    if train.grad_accum_steps is not None:
        return train.grad_accum_steps
    if train.global_batch_tokens is None:
        return 1
    per_pass = train.micro_batch_size * block_size * world_size
    if train.global_batch_tokens % per_pass:
        raise ConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} is not a multiple of micro_batch_size × "
            f"block_size × world_size = {train.micro_batch_size} × {block_size} × {world_size} = {per_pass}"
        )
    return train.global_batch_tokens // per_pass


def _adam_implementation(offload_optimizer: str) -> dict[str, Any]:
    """torch's fused AdamW (one multi-tensor kernel, on GPU and CPU alike) unless the optimizer is offloaded.

    DeepSpeed's own FusedAdam JIT-builds a CUDA extension at first use, which needs nvcc and ninja on every
    node; torch's needs nothing. ZeRO-Offload is the exception: it requires DeepSpeed's CPU Adam.
    """
    return {} if offload_optimizer != "none" else {"torch_adam": True, "fused": True}


def guard_clips(cfg: Config) -> bool:
    """ZeRO 0 in fp32 without offload: DeepSpeed hands the gradients to torch's fused AdamW with no wrapper, and its
    own clipping would take the norm of every gradient one by one. There megagpt's StepGuard, which computes the
    global norm anyway, clips through the optimizer's `grad_scale` instead, and DeepSpeed's clipping is off."""
    ds = cfg.deepspeed
    return ds.zero_stage == 0 and cfg.train.dtype == "fp32" and ds.offload_optimizer == "none"


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    import torch  # here, not at the top: a config check before a launch imports this file without torch

    t, ds = cfg.train, cfg.deepspeed
    accum = grad_accum_steps(t, cfg.model.block_size, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if ds.offload_params != "none":
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": 0.0 if guard_clips(cfg) else t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "adam_w_mode": True,
                **_adam_implementation(ds.offload_optimizer),
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2},
        "steps_per_print": 10**9,  # megagpt logs itself
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.extra)


def frozen_model_config(cfg: Config) -> dict[str, Any]:
    """The config of a ZeRO-3 engine that only holds a frozen model (alignment's reference and reward model,
    megagpt/frozen_models.py): partitioned weights in the run's dtype, no optimizer."""
    t = cfg.train
    return {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": t.dtype == "bf16"},
            "fp16": {"enabled": t.dtype == "fp16"}, "steps_per_print": 10**9}
