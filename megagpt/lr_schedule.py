"""Learning rate as a pure function of the step: linear warmup, then cosine decay to min_lr."""

import math

from megagpt.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def stretched_decay(max_steps_before: int, now: TrainConfig, step: int) -> str | None:
    """A resume's note where train.lr_decay_steps is null (the decay follows max_steps) and train.max_steps changed
    from max_steps_before: the LR from the resume step on is another schedule's, which no changed LR key would
    say."""
    if now.lr_decay_steps is not None or max_steps_before == now.max_steps:
        return None
    old, new = lr_at(step, now.model_copy(update={"max_steps": max_steps_before})), lr_at(step, now)
    if old == new:
        return None
    return (f"train.lr_decay_steps is null, so the LR decays over train.max_steps ({max_steps_before} -> "
            f"{now.max_steps}): step {step + 1} trains at lr {new:.3g}, not {old:.3g}; "
            f"--set train.lr_decay_steps={max_steps_before} keeps the schedule it had")
