"""Training stages: what differs between pre-training, fine-tuning and alignment, behind one small interface.

The training loop (megagpt/train.py) owns everything stages share: the DeepSpeed engine, ZeRO, the LR
schedule, checkpoints with exact and elastic resume, signals, logging. A stage says the rest:
  * which model to build (`build_model`): the GPT, or the GPT with a scalar head for a reward model;
  * what one optimizer step does (`train_step`): for loss-on-batches stages (pretrain, sft, reward, dpo) the
    micro-batch loop of `LossStage`, which only asks for `next_batch` and `loss`; PPO overrides it whole;
  * what evaluation reports (`evaluate`) and what sample text an evaluation shows (`sample`);
  * which statistics of its own each logged step adds to metrics.jsonl (`log_stats`);
  * what of its own a checkpoint must hold to resume exactly (`state_dict`: the data position, a KL
    controller, ...);
  * what a finished run suggests doing with it (`next_step`), and how to prepare the data it reads
    (`prepare_data`, for a data.dataset_dir that holds none).
A new stage is a module here and a line in STAGES; `train.stage` in the config names it.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from megagpt.distributed import mean_over_ranks

STAGES = {"pretrain": "megagpt.stages.pretrain:PretrainStage", "sft": "megagpt.stages.sft:SFTStage",
          "reward": "megagpt.stages.reward:RewardStage", "dpo": "megagpt.stages.dpo:DPOStage",
          "ppo": "megagpt.stages.ppo:PPOStage"}


class LossStage:
    """A stage whose step is: for each micro-batch, loss -> backward; then one optimizer update."""

    grad_accum_steps: int
    device: torch.device
    next_step = "sample it: megagpt sample {run_dir}"  # what a finished run suggests; {run_dir} is filled in
    prepare_data = ("`megagpt prep {{char,sentencepiece}} --input CORPUS --out {dir}` (or `megagpt prep shakespeare "
                    "--out {dir}` for Tiny Shakespeare)")  # the command that makes its dataset; {dir} is filled in

    def __init__(self, cfg, dataset, dist, device: torch.device, grad_accum_steps: int):
        self.cfg, self.dataset, self.dist, self.device = cfg, dataset, dist, device
        self.grad_accum_steps = grad_accum_steps

    def build_model(self) -> torch.nn.Module:
        """The GPT of cfg.model (stages that train something else override this)."""
        from megagpt.model import GPT

        return GPT(self.cfg.model)

    def next_batch(self) -> Any:
        """The next micro-batch of this rank's `self.loader`, moved to the device."""
        return tuple(t.to(self.device, non_blocking=True) for t in next(self.loader))

    def loss(self, engine, batch) -> torch.Tensor:
        """A scalar loss of one micro-batch (before the engine's gradient-accumulation scaling)."""
        raise NotImplementedError

    def train_step(self, engine, guard) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; the loss averaged over them and the ranks,
        left on the device."""
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum_steps):
            loss = self.loss(engine, self.next_batch())
            engine.backward(guard.watch(loss))
            if micro == self.grad_accum_steps - 1:
                guard.before_update()
            engine.step()  # only the last micro-batch's call updates the weights
            total += loss.detach().float()
        return mean_over_ranks(total / self.grad_accum_steps)

    def evaluate(self, engine) -> dict[str, float]:
        return {}

    def log_stats(self) -> dict[str, float]:
        """The stage's own training statistics since the last log (a host read: called at log intervals only),
        logged beside the loss (reward accuracy, DPO margins, PPO's rollout and update statistics)."""
        return {}

    def sample(self, engine, step: int) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def stage_class(name: str) -> type:
    """The stage class named by `train.stage`."""
    module_name, class_name = STAGES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_stage(name: str, **context):
    """The stage class named by `train.stage`, built with the run's context (cfg, dataset, dist, device...)."""
    return stage_class(name)(**context)
