"""Non-finite steps: a NaN/inf loss or gradient norm skips the optimizer update on every rank, and is counted.

DeepSpeed already skips an update whose gradients are not finite in every optimizer wrapper it builds for
ZeRO 1-3, fp16 and bf16 (the fp16 dynamic-loss-scale overflow path; `engine.skipped_steps` counts them).
megagpt reuses that path and closes its gaps:
  * a non-finite loss does not always give non-finite gradients (loss + nan has a gradient of 1), so the
    loss is multiplied by 1 or NaN before backward: a bad micro-batch on any rank poisons the reduced
    gradient, and the overflow check skips the update everywhere;
  * ZeRO 1/2 in bf16 only checks when `bf16.check_grad_overflow` is on: the guard switches it on;
  * ZeRO 0 in fp32 hands the gradients to a plain torch optimizer with no check at all: the guard checks the
    (already all-reduced, hence identical on every rank) gradient norm and gives the optimizer the same
    `overflow` flag DeepSpeed's wrappers have, which the engine reads to count the skip; the optimizer's
    step is wrapped to do nothing while it is set (weights, moments and AdamW's step count untouched).
A skipped step with a finite loss under fp16 is ordinary loss scaling, not a bad step.
"""

from __future__ import annotations

import math

import torch

from megagpt.errors import UserError


class NonFiniteTraining(UserError):
    """Too many non-finite steps in a row: the run stops without saving."""


class StepGuard:
    def __init__(self, engine, max_bad_steps: int, fp16: bool):
        self.engine, self.max_bad_steps, self.fp16 = engine, max_bad_steps, fp16
        self.bad_in_row = 0
        optimizer = engine.optimizer
        self._plain_optimizer = not hasattr(optimizer, "overflow")  # ZeRO 0 fp32: a torch optimizer
        if self._plain_optimizer:
            _make_skippable(optimizer)
        if getattr(optimizer, "check_grad_overflow", True) is False:
            optimizer.check_grad_overflow = True  # ZeRO 1/2 bf16: see the module docstring
        self._skipped_before = 0
        self._plain_norm = float("nan")

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backward: itself when finite, NaN otherwise (no host sync: one multiply)."""
        one_or_nan = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
        return loss * one_or_nan

    def before_update(self) -> None:
        """Call after the last backward of a step and before its `engine.step()`."""
        self._skipped_before = self.engine.skipped_steps
        if self._plain_optimizer:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self._plain_norm = norm.item()
            self.engine.optimizer.overflow = not math.isfinite(self._plain_norm)

    def grad_norm(self) -> float:
        """The last step's gradient norm before clipping: DeepSpeed's, or (ZeRO 0 fp32, where DeepSpeed keeps
        none) the one this guard computed anyway."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._plain_norm
        return float(norm)

    def after_update(self, loss: float, step: int) -> bool:
        """Whether the update was skipped; raises once `max_bad_steps` bad steps came in a row."""
        skipped = self.engine.skipped_steps > self._skipped_before
        bad = not math.isfinite(loss) or (skipped and not self.fp16)
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        if self.bad_in_row >= self.max_bad_steps:
            raise NonFiniteTraining(
                f"{self.bad_in_row} non-finite steps in a row (loss or gradient norm), the last at step "
                f"{step}: "
                f"stopping without saving; the last checkpoint is untouched (lower train.lr, check the data, "
                f"or raise train.max_bad_steps)"
            )
        return skipped


def _make_skippable(optimizer) -> None:
    """A torch optimizer whose step() does nothing while `optimizer.overflow` is set, as DeepSpeed's do."""
    step = optimizer.step

    def step_unless_overflow(*args, **kwargs):
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_unless_overflow
