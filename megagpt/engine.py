"""The DeepSpeed engine of a run: the stage's model, its optimizer parameter groups, and deepspeed.initialize."""

from __future__ import annotations

import torch

from megagpt.config import Config, ModelConfig
from megagpt.distributed import DistInfo
from megagpt.ds_config import deepspeed_config
from megagpt.model import is_hidden_matrix


def param_groups(model: torch.nn.Module, weight_decay: float, model_cfg: ModelConfig | None = None) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on gains and biases. Under µP the hidden
    matrices form a group of their own with LR lr/m (m = n_embd / mup_base_width); embeddings, norms and
    biases keep lr. Each group's "lr_scale" is saved with the optimizer state (ZeRO 1-3, universal
    checkpoints); the training loop sets group["lr"] = lr × group["lr_scale"] every step."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}
    if model_cfg is None or model_cfg.parametrization == "standard":
        decay = {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0}
        return [decay, no_decay]
    hidden = [p for name, p in named if is_hidden_matrix(name, p)]
    others = [p for name, p in named if p.dim() >= 2 and not is_hidden_matrix(name, p)]
    return [{"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / model_cfg.mup_width_multiplier},
            {"params": others, "weight_decay": weight_decay, "lr_scale": 1.0}, no_decay]


def build_engine(cfg: Config, dist: DistInfo, build_model, load_universal: bool = False):
    """deepspeed.initialize on `build_model()`; identical initial weights on every rank."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model()
    torch.manual_seed(cfg.train.seed + dist.rank)  # but a different dropout stream per rank
    ds_config = deepspeed_config(cfg, dist.world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    groups = param_groups(model, cfg.train.weight_decay, cfg.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    forget_the_warm_up_step(engine)
    if dist.world_size == 1 and not engine.zero_optimization():
        # one rank, ZeRO 0: nothing to reduce (DeepSpeed would flatten every gradient, all-reduce it with itself
        # and copy it back, every step)
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()
    return engine


def _zero_0_16_bit(engine):
    """DeepSpeed's ZeRO-0 bf16/fp16 optimizer wrapper around megagpt's torch AdamW (FP16_UnfusedOptimizer: fp32
    masters in unnamed `fp32_groups` lists), or None (fp32, ZeRO 1-3)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return engine.optimizer if isinstance(engine.optimizer, FP16_UnfusedOptimizer) else None


def master_names(engine) -> list[list[str]] | None:
    """The parameter names of a 16-bit ZeRO-0 run's fp32 master weights (DeepSpeed's unnamed `fp32_groups`, group
    by group), for a checkpoint to carry beside them; None where DeepSpeed keeps no such list (fp32, ZeRO 1-3,
    whose files zero_to_fp32 reads by name)."""
    wrapper = _zero_0_16_bit(engine)
    if wrapper is None:
        return None
    name_of = {id(p): name for name, p in engine.module.named_parameters()}
    return [[name_of[id(p)] for p in group] for group in wrapper.fp16_groups]


def forget_the_warm_up_step(engine) -> None:
    """Undo the step DeepSpeed's 16-bit optimizer wrappers take when built (ZeRO 0 in bf16 or fp16, the CPU
    default `auto` on a CPU with native bf16): `initialize_optimizer_states` steps AdamW once on zero gradients.
    torch's AdamW counts that step, so every later bias correction was the next step's (the first update 0.74x
    the LR's, the second 0.86x, with betas 0.9, 0.99), and it decays the fp32 master weights once at the
    config's LR. Here: no optimizer state (the first real step makes it), master weights copied back from the
    model's. ZeRO 1-3 wrappers build no state; a resume loads its own over this."""
    wrapper = _zero_0_16_bit(engine)
    if wrapper is not None:
        wrapper.optimizer.state.clear()
        wrapper.refresh_fp32_params()
