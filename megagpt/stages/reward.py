"""Reward model: the Bradley-Terry loss on preference pairs (a dataset of kind `preferences`).

The model (megagpt/reward_model.py) is the GPT backbone, usually an SFT model's (`train.init_from`), with a
scalar head read at each completion's end-of-turn token: r(x, y). One micro-batch of B pairs is one forward of
2B rows (chosen, then rejected); the loss is -log σ(r_chosen - r_rejected). Logged with the loss: the pairwise
accuracy (r_chosen > r_rejected) and the mean margin r_chosen - r_rejected of the training pairs; evaluation
reports both on the held-out (val) pairs.

The stages on pairs (this one and dpo) share `PairStage` (the pair loader, the val pairs, the checkpointed data
position) and `PairStats` (their device-side statistics).
"""

from __future__ import annotations

from typing import Any

import torch

from megagpt.align_objectives import bradley_terry_loss
from megagpt.config import Config
from megagpt.dataset import Dataset
from megagpt.distributed import DistInfo, mean_over_ranks
from megagpt.preference_data import PairLoader, Pairs, eval_pair_batches, score_rows
from megagpt.reward_model import RewardModel, read_scores
from megagpt.stages import LossStage


class PairStats:
    """Sums of per-pair statistics on the device (no host read per step); `read` averages them over ranks."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names, self.device = names, device
        self.sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # ..., pair count

    def add(self, weight: torch.Tensor | None = None, **values: torch.Tensor) -> None:
        w = torch.ones_like(values[self.names[0]]) if weight is None else weight.to(self.device)
        rows = [(values[name].detach().double() * w).sum() for name in self.names]
        self.sums += torch.stack([*rows, w.double().sum()])

    def read(self, prefix: str = "") -> dict[str, float]:
        """The means since the last read (a collective: every rank calls it), then a new window."""
        *totals, count = mean_over_ranks(self.sums).tolist()  # a ratio of means is the ratio of sums
        self.sums.zero_()
        if count == 0:
            return {}
        return {f"{prefix}{name}": total / count for name, total in zip(self.names, totals, strict=True)}


class PairStage(LossStage):
    """A LossStage on preference pairs (reward, dpo): the pair loader, built first (it refuses other dataset
    kinds), the val pairs from the first evaluation on, and the loader's position in each checkpoint."""

    prepare_data = ("`megagpt prep preferences --input PAIRS.jsonl --tokenizer SFT_RUN --out {dir}` (or `megagpt "
                    "prep shakespeare-prefs --sft SFT_RUN --qa QA_DIR --out {dir}` for the demo's pairs)")

    def __init__(self, cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device,
                 grad_accum_steps: int):
        super().__init__(cfg, dataset, dist, device, grad_accum_steps)
        self.loader = PairLoader(dataset, cfg.model.block_size, cfg.train.micro_batch_size, grad_accum_steps,
                                 dist.rank, dist.world_size, seed=cfg.train.seed)
        self._val: Pairs | None = None

    def val_pairs(self) -> Pairs:
        """The val split's pairs (indexed at the first evaluation, then kept)."""
        if self._val is None:
            self._val = Pairs(self.dataset, "val")
        return self._val

    def val_batches(self):
        """This rank's (pairs, weight) micro-batches of the first eval_steps x micro_batch x world val pairs."""
        limit = self.cfg.train.eval_steps * self.cfg.train.micro_batch_size * self.dist.world_size
        return eval_pair_batches(self.val_pairs(), self.cfg.train.micro_batch_size, limit, self.dist.rank,
                                 self.dist.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


class RewardStage(PairStage):
    next_step = "align with it: --set align.reward_model={run_dir} on a train.stage: ppo config"

    def __init__(self, cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device,
                 grad_accum_steps: int):
        super().__init__(cfg, dataset, dist, device, grad_accum_steps)
        self.stats = PairStats(("accuracy", "margin"), device)

    def build_model(self) -> torch.nn.Module:
        return RewardModel(self.cfg.model)

    def next_batch(self):
        ids, last = score_rows(next(self.loader), self.cfg.model.block_size)
        return ids.to(self.device, non_blocking=True), last.to(self.device, non_blocking=True)

    def rewards(self, engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), each (B,), of a micro-batch of 2B rows."""
        ids, last = batch
        scores = read_scores(engine(ids)[0], last).float()
        return scores.chunk(2)

    def loss(self, engine, batch) -> torch.Tensor:
        chosen, rejected = self.rewards(engine, batch)
        self.stats.add(accuracy=(chosen > rejected).float(), margin=chosen - rejected)
        return bradley_terry_loss(chosen, rejected)

    def log_stats(self) -> dict[str, float]:
        return self.stats.read()

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Loss, pairwise accuracy and margin over the first eval_steps x micro_batch x world val pairs."""
        if len(self.val_pairs()) == 0:
            return {}
        stats = PairStats(("loss", "accuracy", "margin"), self.device)
        engine.eval()
        for pairs, weight in self.val_batches():
            ids, last = score_rows(pairs, self.cfg.model.block_size)
            chosen, rejected = self.rewards(engine, (ids.to(self.device), last.to(self.device)))
            margin = chosen - rejected
            stats.add(weight, loss=-torch.nn.functional.logsigmoid(margin), accuracy=(margin > 0).float(),
                      margin=margin)
        engine.train()
        return stats.read("val_")
