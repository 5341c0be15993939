"""Shared test helpers: the repo's paths, the one tiny-model builder, rel_err, reading a run's metrics, and a step
guard on a bare fused AdamW."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megagpt.metrics import read_metrics

REPO = Path(__file__).absolute().parents[1]  # not resolve(): a symlinked checkout stays itself
CONFIGS = REPO / "configs"
CPU_CONFIG = CONFIGS / "shakespeare_char_cpu.yaml"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}
# dtype fp32: the CPU config's `auto` would be bf16 on a CI machine with native bf16, and exactness needs fp32
TINY_TRAIN = {"micro_batch_size": 8, "max_steps": 20, "eval_interval": 10, "eval_steps": 2, "log_interval": 1,
              "checkpoint_interval": 10, "sample_tokens": 16, "warmup_steps": 5, "threads": 1, "dtype": "fp32"}


def tiny_overrides(dataset_dir: Path, tensorboard: bool = True, **values) -> list[str]:
    """`--set` overrides for a 2-layer, 32-wide GPT on a prepared dataset, quiet and quick.

    Keyword arguments override TINY_TRAIN's train.* values; `model_<key>` sets model.<key> and `zero_stage`
    deepspeed.zero_stage."""
    model = {**TINY_MODEL, **{k.removeprefix("model_"): values.pop(k) for k in list(values)
                              if k.startswith("model_")}}
    zero = values.pop("zero_stage", 0)
    train = {**TINY_TRAIN, **values}
    return [*(f"model.{k}={v}" for k, v in model.items()), f"data.dataset_dir={dataset_dir}",
            "logging.progress_bar=false", f"logging.tensorboard={str(tensorboard).lower()}",
            f"deepspeed.zero_stage={zero}", *(f"train.{k}={v}" for k, v in train.items())]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64. An exactly-zero reference (T=1: dq, dk; C=1: dx, dw) is measured against
    an RMS floor of 0.01, 1% of the unit scale of random inputs: rounding noise around zero passes, real errors
    do not."""
    return ((a.double() - ref).norm() / max(ref.norm().item(), 1e-2 * math.sqrt(ref.numel()))).item()


def metrics(run_dir: Path) -> list[dict]:
    """run_dir/metrics.jsonl's records ([] before the run wrote any)."""
    return read_metrics(run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (a resumed run appends to metrics.jsonl)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def train_records(run_dir: Path) -> list[dict]:
    """The logged training steps (not evaluations), in order."""
    return [r for r in metrics(run_dir) if "loss" in r]


class _PlainEngine:
    """What StepGuard reads of a DeepSpeed engine at ZeRO 0 in fp32: torch's fused AdamW, DeepSpeed's clipping off."""

    skipped_steps = 0

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def gradient_clipping(self) -> float:
        return 0.0

    def get_global_grad_norm(self):
        return None


def guarded_adamw(weights: torch.Tensor, grad_clip: float, max_bad_steps: int = 3):
    """(parameter, fused AdamW on it, StepGuard over both) for the guard's unit tests."""
    from megagpt.step_guard import StepGuard

    w = torch.nn.Parameter(weights.clone())
    optimizer = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0, fused=True)
    guard = StepGuard(_PlainEngine(optimizer), max_bad_steps, fp16=False, device=torch.device("cpu"),
                      grad_clip=grad_clip)
    return w, optimizer, guard


def guarded_step(w, optimizer, guard, grad: torch.Tensor, loss: float = 1.0) -> None:
    """One optimizer step through the guard, as LossStage.train_step takes it, with the given gradient and loss."""
    w.grad = grad.clone()
    guard.before_update()
    optimizer.step()
    guard.after_update(torch.tensor(loss))
