"""Direct preference optimisation: the policy learns from preference pairs against a frozen reference, with no
reward model and no sampling (Rafailov et al. 2023).

The policy starts from the SFT model (`train.init_from`); the reference is a frozen copy of it
(`align.reference`, default the same SFT model; megagpt/frozen_models.py). One micro-batch of B pairs is one
policy forward and one reference forward of 2B rows (chosen, then rejected), each row's log-probability of its
reply summed over the reply's tokens (its mask). With the implicit reward β (log π(y|x) - log π_ref(y|x)), the
loss is -log σ(reward_chosen - reward_rejected) (megagpt/align_objectives.py). Logged with the loss: the implicit
rewards of the chosen and rejected replies, their margin, and the accuracy (chosen reward > rejected reward);
evaluation reports the same on the held-out pairs.
"""

from __future__ import annotations

import torch

from megagpt.align_objectives import dpo_loss, sequence_logprobs
from megagpt.config import Config, ConfigError
from megagpt.dataset import Dataset
from megagpt.distributed import DistInfo
from megagpt.frozen_models import load_reference
from megagpt.preference_data import Prompts, pair_rows
from megagpt.rollout import reply_text
from megagpt.stages.reward import PairStage, PairStats

STATS = ("chosen_reward", "rejected_reward", "margin", "accuracy")


class DPOStage(PairStage):
    next_step = "talk to it: megagpt chat {run_dir}"

    def __init__(self, cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device,
                 grad_accum_steps: int):
        super().__init__(cfg, dataset, dist, device, grad_accum_steps)  # the loader first: it refuses other kinds
        if not (cfg.align.reference or cfg.train.init_from):
            raise ConfigError("train.stage=dpo needs the SFT model: set train.init_from (also the reference) or "
                              "align.reference")
        self.reference = load_reference(cfg, dataset, device)
        self.stats = PairStats(STATS, device)
        self._sample_prompt: list[int] | None = None

    def next_batch(self):
        x, y = pair_rows(next(self.loader), self.cfg.model.block_size)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def terms(self, engine, batch):
        """(loss, chosen rewards, rejected rewards) of a micro-batch of 2B rows."""
        x, y = batch
        policy = sequence_logprobs(engine(x)[0], y)
        with torch.no_grad():
            reference = sequence_logprobs(self.reference(x)[0], y)
        return dpo_loss(*policy.chunk(2), *reference.chunk(2), self.cfg.align.beta)

    def loss(self, engine, batch) -> torch.Tensor:
        loss, chosen, rejected = self.terms(engine, batch)
        self.stats.add(chosen_reward=chosen, rejected_reward=rejected, margin=chosen - rejected,
                       accuracy=(chosen > rejected).float())
        return loss

    def log_stats(self) -> dict[str, float]:
        return self.stats.read()

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """The DPO loss, implicit rewards, margin and accuracy over the first eval_steps x micro_batch x world
        val pairs."""
        if len(self.val_pairs()) == 0:
            return {}
        stats = PairStats(("loss", *STATS), self.device)
        engine.eval()
        for pairs, weight in self.val_batches():
            x, y = (t.to(self.device) for t in pair_rows(pairs, self.cfg.model.block_size))
            _, chosen, rejected = self.terms(engine, (x, y))
            margin = chosen - rejected
            stats.add(weight, loss=-torch.nn.functional.logsigmoid(margin), chosen_reward=chosen,
                      rejected_reward=rejected, margin=margin, accuracy=(margin > 0).float())
        engine.train()
        return stats.read("val_")

    def sample(self, engine, step: int) -> str | None:
        """The reply to the first val pair's prompt (every rank runs it: ZeRO-3 needs all of them)."""
        if self.cfg.train.sample_tokens == 0:
            return None
        if self._sample_prompt is None:
            val = Prompts(self.dataset, "val", self.cfg.model.block_size - 1)
            self._sample_prompt = (val if len(val) else Prompts(self.dataset, "train",
                                                                self.cfg.model.block_size - 1))[0]
        return reply_text(engine.module, self.dataset.tokenizer, self._sample_prompt, self.cfg.train.sample_tokens,
                          self.cfg.train.seed + step, self.cfg.deepspeed.zero_stage == 3)
