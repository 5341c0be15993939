"""The DeepSpeed engine of a run: the stage's model, its optimizer parameter groups, and deepspeed.initialize."""

from __future__ import annotations

import torch

from megagpt.config import Config
from megagpt.distributed import DistInfo
from megagpt.ds_config import deepspeed_config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_engine(cfg: Config, dist: DistInfo, build_model, load_universal: bool = False):
    """deepspeed.initialize on `build_model()`; identical initial weights on every rank."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model()
    torch.manual_seed(cfg.train.seed + dist.rank)  # but a different dropout stream per rank
    ds_config = deepspeed_config(cfg, dist.world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    groups = param_groups(model, cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if cfg.train.compile:
        engine.compile()
    return engine
