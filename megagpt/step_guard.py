"""Non-finite steps: a NaN/inf loss or gradient norm skips the optimizer update on every rank, and is counted,
without reading anything back to the host: the counts stay on the device until a log interval or a checkpoint.

DeepSpeed already skips an update whose gradients are not finite in every optimizer wrapper it builds for
ZeRO 1-3, fp16 and bf16 (the fp16 dynamic-loss-scale overflow path; `engine.skipped_steps` counts them).
megagpt reuses that path and closes its gaps:
  * a non-finite loss does not always give non-finite gradients (loss + nan has a gradient of 1), so the
    loss is multiplied by 1 or NaN before backward: a bad micro-batch on any rank poisons the reduced
    gradient, and the overflow check skips the update everywhere;
  * ZeRO 1/2 in bf16 only checks when `bf16.check_grad_overflow` is on: the guard switches it on;
  * ZeRO 0 in fp32 hands the gradients to torch's fused AdamW with no check at all: the guard computes the
    (already all-reduced, hence identical on every rank) gradient norm in one multi-tensor pass and gives the
    optimizer a `found_inf` tensor, the same on-device skip torch's GradScaler uses: weights, moments and
    AdamW's step count stay untouched when it is 1, and nothing is read back to the host. The same norm clips
    the gradients (`ds_config.guard_clips`): AdamW divides them by its `grad_scale`, max(1, norm / grad_clip),
    inside its one kernel, instead of DeepSpeed taking the norm again gradient by gradient and scaling each.
A skipped step with a finite loss under fp16 is ordinary loss scaling, not a bad step.
"""

from __future__ import annotations

import torch

from megagpt.config import ConfigError
from megagpt.errors import UserError


class NonFiniteTraining(UserError):
    """Too many non-finite steps in a row: the run stops without saving."""


class StepGuard:
    def __init__(self, engine, max_bad_steps: int, fp16: bool, device: torch.device, skipped_steps: int = 0,
                 grad_clip: float = 0.0):
        """`grad_clip`: the max gradient norm the guard applies (ZeRO 0 fp32, where DeepSpeed's clipping is off)."""
        self.engine, self.max_bad_steps, self.fp16 = engine, max_bad_steps, fp16
        optimizer = engine.optimizer
        self._plain_optimizer = not hasattr(optimizer, "overflow")  # ZeRO 0 fp32: torch's fused AdamW
        if self._plain_optimizer and not optimizer.defaults.get("fused"):
            raise RuntimeError("ZeRO 0 in fp32 needs torch's fused AdamW (it skips on `found_inf`)")
        # clip here only where DeepSpeed does not (`deepspeed.extra` may have switched its clipping back on)
        self._clip = grad_clip if self._plain_optimizer and not engine.gradient_clipping() else 0.0
        if grad_clip and not self._plain_optimizer and not engine.gradient_clipping():
            raise ConfigError("deepspeed.extra gives DeepSpeed an optimizer wrapper that megagpt's config did not "
                            "(its ZeRO stage or dtype), so train.grad_clip would apply nowhere: set "
                            "deepspeed.zero_stage and train.dtype instead")
        if getattr(optimizer, "check_grad_overflow", True) is False:
            optimizer.check_grad_overflow = True  # ZeRO 1/2 bf16: see the module docstring
        self._bad_in_row = torch.zeros((), dtype=torch.int64, device=device)
        self._worst_run = torch.zeros((), dtype=torch.int64, device=device)  # the longest since the last check
        self._skipped = torch.full((), skipped_steps, dtype=torch.int64, device=device)
        self._skipped_before = 0
        self._plain_norm = torch.full((), float("nan"), device=device)

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backward: itself when finite, NaN otherwise (no host sync: one multiply)."""
        one_or_nan = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
        return loss * one_or_nan

    def before_update(self) -> None:
        """Call after the last backward of a step and before its `engine.step()`."""
        self._skipped_before = self.engine.skipped_steps
        if self._plain_optimizer:
            optimizer = self.engine.optimizer
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            self._plain_norm = norm
            optimizer.found_inf = (~torch.isfinite(norm)).float()
            if self._clip:  # the clip_grad_norm_ formula: scale by grad_clip / (norm + 1e-6) when that is < 1
                optimizer.grad_scale = torch.clamp((norm + 1e-6) / self._clip, min=1.0)

    def after_update(self, loss: torch.Tensor) -> None:
        """Count the step as skipped and/or bad, on the device."""
        if self._plain_optimizer:
            skipped = self.engine.optimizer.found_inf.to(torch.int64)
        else:  # DeepSpeed's wrappers decided on the host already (their own sync)
            skipped = torch.tensor(int(self.engine.skipped_steps > self._skipped_before),
                                   device=self._skipped.device)
        bad = ~torch.isfinite(loss) | ((skipped > 0) & (not self.fp16))
        self._bad_in_row = (self._bad_in_row + 1) * bad
        self._worst_run = torch.maximum(self._worst_run, self._bad_in_row)
        self._skipped += skipped

    def check(self, step: int) -> None:
        """Raise once `max_bad_steps` bad steps came in a row (a host read: call it at log intervals and before
        every checkpoint, so a poisoned state is never saved)."""
        bad_in_row = int(self._worst_run.item())
        if bad_in_row >= self.max_bad_steps:
            raise NonFiniteTraining(
                f"{bad_in_row} non-finite steps in a row (loss or gradient norm), the last by step {step}: "
                f"stopping without saving; the last checkpoint is untouched (lower train.lr, check the data, "
                f"or raise train.max_bad_steps)"
            )

    def skipped_steps(self) -> int:
        """Skipped updates since the run began (a host read)."""
        return int(self._skipped.item())

    def grad_norm(self) -> float:
        """The last step's gradient norm before clipping: DeepSpeed's, or (ZeRO 0 fp32, where DeepSpeed keeps
        none) the one this guard computed anyway (a host read)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._plain_norm
        return float(norm)
