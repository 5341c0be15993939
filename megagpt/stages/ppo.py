"""PPO (InstructGPT, DeepSpeed-Chat step 3): the policy samples replies to prompts, a frozen reward model scores
them, and clipped policy-gradient updates raise the score while a per-token KL penalty keeps the policy near a
frozen reference.

Models: the policy from the SFT model (`train.init_from`); the value model from the reward model
(`align.reward_model`: it already maps a conversation to a number); both trained, as one module (megagpt/
reward_model.py PolicyWithValue) in the run's one DeepSpeed engine (ZeRO 0-3, one optimizer, one checkpoint).
The reference (`align.reference`, default the SFT model) and the reward model are frozen (megagpt/
frozen_models.py).

One training step (`train_step`, this stage's own):
  1. rollout: `align.rollout_minibatches` global batches of prompts (megagpt/preference_data.py PromptSchedule);
     each rank samples a reply per prompt, all its prompts in one batch with the KV cache (megagpt/rollout.py),
     and computes, per micro-batch, the old log-probs and values, the reference's log-probs and the reward
     model's score;
  2. rewards r_t = -β_KL (log π_old - log π_ref) per reply token, plus the score at the last one; GAE advantages
     and returns; advantages whitened over the whole global batch (all ranks);
  3. `align.ppo_epochs` passes over the rollout, one optimizer update per global mini-batch (mini-batch order
     shuffled per epoch, the same on every rank): loss = clipped policy loss + vf_coef x clipped value loss;
  4. the KL controller moves β_KL toward `align.target_kl` (when set) from the batch's mean KL.
Everything random is seeded by (train.seed, step, position), and the stage's state (its step, hence the prompt
position, and β_KL) is in every checkpoint: a resumed run repeats the same steps. The statistics of each step
(megagpt/train.py logs them with the loss) are global means: the reward model's score, the reward (score minus
the KL penalty), the KL to the reference, the entropy, the clip fractions, the value loss, the approximate KL
between PPO epochs, the reply length and stop rate, and tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from megagpt.align_objectives import (
    KLController,
    gae,
    kl_penalised_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from megagpt.chat_template import END, require_chat_tokens
from megagpt.config import Config, ConfigError
from megagpt.dataset import Dataset
from megagpt.distributed import DistInfo, mean_over_ranks
from megagpt.frozen_models import load_reference, load_reward_model
from megagpt.preference_data import Prompts, PromptSchedule
from megagpt.reward_model import PolicyWithValue
from megagpt.rollout import Experience, experience, prompt_seed, reply_text, sample_replies
from megagpt.stages import LossStage

UPDATE_STATS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "loss")
# Per micro-batch sums of a rollout, summed over micro-batches and ranks: the whitening's moments and the statistics.
ROLLOUT_SUMS = ("advantage", "advantage_sq", "reply_tokens", "replies", "score", "reward", "kl", "entropy",
                "stopped", "tokens")


class PPOStage(LossStage):
    next_step = "talk to it: megagpt chat {run_dir}"
    prepare_data = ("`megagpt prep preferences --input PAIRS.jsonl --tokenizer SFT_RUN --out {dir}` (its prompts; or "
                    "`megagpt prep shakespeare-prefs --sft SFT_RUN --qa QA_DIR --out {dir}` for the demo's)")

    def __init__(self, cfg: Config, dataset: Dataset, dist: DistInfo, device: torch.device,
                 grad_accum_steps: int):
        self.cfg, self.dataset, self.dist, self.device = cfg, dataset, dist, device
        self.grad_accum_steps = grad_accum_steps
        if cfg.model.dropout > 0:
            raise ConfigError(f"model.dropout={cfg.model.dropout}: ppo needs 0 (the rollout's log-probs must be the "
                              f"policy's own at the first update); --set model.dropout=0")
        self.align = cfg.align
        self.special = require_chat_tokens(dataset.tokenizer)
        self.prompts = Prompts(dataset, "train", cfg.model.block_size - 1)  # first: refuses other kinds
        self.schedule = PromptSchedule(len(self.prompts), cfg.train.micro_batch_size, grad_accum_steps,
                                       cfg.align.rollout_minibatches, dist.rank, dist.world_size, cfg.train.seed)
        self.reward_model, reward_cfg = load_reward_model(cfg, dataset, device)
        self.value_cfg = reward_cfg.model
        self.reference = load_reference(cfg, dataset, device)
        self.kl = KLController(cfg.align.kl_coef, cfg.align.target_kl, cfg.align.kl_horizon)
        self.lockstep = cfg.deepspeed.zero_stage == 3  # every forward is a collective
        self.step = 0
        self._stats: dict[str, float] = {}
        self._val: Prompts | None = None

    def build_model(self) -> torch.nn.Module:
        """The policy (train.init_from loads it) with the value model, which starts as the reward model."""
        import deepspeed

        model = PolicyWithValue(self.cfg.model, self.value_cfg)
        # under ZeRO-3 the frozen reward model is partitioned: gathered (on every rank) for the copy
        with deepspeed.zero.GatheredParameters(list(self.reward_model.parameters())):
            model.value.load_state_dict(self.reward_model.state_dict())
        return model

    # ------------------------------------------------------------ one step

    def train_step(self, engine, guard) -> torch.Tensor:
        started = time.perf_counter()
        batches, rollout_s = self.rollout(engine)
        rollout_stats = self.score(batches)
        totals = torch.zeros(len(UPDATE_STATS), dtype=torch.float64, device=self.device)
        updates = 0
        for epoch in range(self.align.ppo_epochs):
            order = np.random.default_rng([self.cfg.train.seed, self.step, epoch]).permutation(len(batches))
            for j in order:  # one optimizer update per global mini-batch
                for micro, batch in enumerate(batches[j]):
                    loss, stats = self.ppo_loss(engine, batch)
                    engine.backward(guard.watch(loss))
                    if micro == self.grad_accum_steps - 1:
                        guard.before_update()
                    engine.step()
                    totals += torch.stack([stats[name].double() for name in UPDATE_STATS])
                    updates += 1
        means = mean_over_ranks(totals / updates)
        self.kl.update(rollout_stats["kl"], rollout_stats["replies"])
        tokens, replies = rollout_stats.pop("tokens"), rollout_stats.pop("replies")
        self._stats = {**rollout_stats, **dict(zip(UPDATE_STATS, means.tolist(), strict=True)),
                       "kl_coef_next": self.kl.value,
                       "tokens_per_sec": tokens / (time.perf_counter() - started),
                       "rollout_tokens_per_sec": rollout_stats["response_length"] * replies / max(rollout_s, 1e-9)}
        self.step += 1
        return means[UPDATE_STATS.index("loss")].float()

    def rollout(self, engine) -> tuple[list[list[Experience]], float]:
        """[mini-batch][micro-batch] experience of this rank; the seconds spent sampling (all of this rank's
        prompts of the step in one batch)."""
        started = time.perf_counter()
        schedule = self.schedule.step_positions(self.step)  # [mini-batch][micro-batch] -> global positions
        flat = [p for minibatch in schedule for micro in minibatch for p in micro]
        prompts = [self.prompts[self.schedule.prompt_index(p)] for p in flat]
        replies = self.replies(engine.module, prompts, [prompt_seed(self.cfg.train.seed, p) for p in flat])
        rollout_s = time.perf_counter() - started
        engine.eval()
        batches, k = [], 0
        for minibatch in schedule:
            batches.append([])
            for micro in minibatch:
                got = replies[k:k + len(micro)]
                batches[-1].append(experience(engine, self.reference, self.reward_model, prompts[k:k + len(micro)],
                                              [r for r, _ in got], [s for _, s in got], self.align.temperature,
                                              self.align.no_stop_penalty, self.device))
                k += len(micro)
        engine.train()
        return batches, rollout_s

    def replies(self, model, prompts: list[list[int]], seeds: list[int]) -> list[tuple[list[int], bool]]:
        return sample_replies(model, prompts, self.special[END], self.align.max_new_tokens, self.align.temperature,
                              seeds, self.lockstep)

    def score(self, batches: list[list[Experience]]) -> dict[str, float]:
        """Rewards with the KL penalty, GAE, advantages whitened over all ranks; the rollout's statistics."""
        flat = [b for minibatch in batches for b in minibatch]
        for b in flat:
            b.rewards, b.kl = kl_penalised_rewards(b.logprobs, b.ref_logprobs, b.mask, b.scores, self.kl.value)
            b.advantages, b.returns = gae(b.rewards, b.values, b.mask, self.align.gamma, self.align.lam)
        sums = torch.stack([rollout_sums(b, self.kl.value) for b in flat]).sum(dim=0)
        t = dict(zip(ROLLOUT_SUMS, (mean_over_ranks(sums) * self.dist.world_size).tolist(), strict=True))
        mean = t["advantage"] / t["reply_tokens"]
        var = max(t["advantage_sq"] / t["reply_tokens"] - mean * mean, 0.0)
        for b in flat:
            b.advantages = whiten(b.advantages, b.mask, mean, var)
        n = t["replies"]
        return {"reward_model_score": t["score"] / n, "reward": t["reward"] / n, "kl": t["kl"] / n,
                "kl_coef": self.kl.value, "entropy": t["entropy"] / t["reply_tokens"],
                "response_length": t["reply_tokens"] / n, "stop_rate": t["stopped"] / n, "replies": int(n),
                "tokens": t["tokens"]}

    def ppo_loss(self, engine, b: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, values = engine(b.ids)
        logprobs = token_logprobs(logits[:, :-1].float() / self.align.temperature, b.ids[:, 1:])
        policy_loss, stats = ppo_policy_loss(logprobs, b.logprobs, b.advantages, b.mask, self.align.cliprange)
        value_loss, value_clipfrac = ppo_value_loss(values[:, :-1].float(), b.values, b.returns, b.mask,
                                                    self.align.cliprange_value)
        loss = policy_loss + self.align.vf_coef * value_loss
        return loss, {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                      "clipfrac": stats["clipfrac"], "value_clipfrac": value_clipfrac,
                      "approx_kl": stats["approx_kl"], "loss": loss.detach()}

    def log_stats(self) -> dict[str, float]:
        """The last step's statistics (every step's, with train.log_interval 1)."""
        return dict(self._stats)

    # ------------------------------------------------------------ evaluation and samples

    def val_prompts(self) -> Prompts:
        if self._val is None:
            self._val = Prompts(self.dataset, "val", self.cfg.model.block_size - 1)
        return self._val if len(self._val) else self.prompts

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """The reward model's score, KL to the reference, reply length and stop rate of replies to the first
        eval_steps x micro_batch x world val prompts (sampled as in rollouts, with fixed seeds)."""
        prompts = self.val_prompts()
        mb, world = self.cfg.train.micro_batch_size, self.dist.world_size
        count = min(len(prompts), self.cfg.train.eval_steps * mb * world)
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        for b in range(-(-count // (mb * world))):
            positions = [(b * world + self.dist.rank) * mb + i for i in range(mb)]
            chosen = [prompts[p % len(prompts)] for p in positions]
            replies = self.replies(engine.module, chosen,
                                   [prompt_seed(self.cfg.train.seed, p, stream=1) for p in positions])
            engine.eval()
            e = experience(engine, self.reference, self.reward_model, chosen, [r for r, _ in replies],
                           [s for _, s in replies], self.align.temperature, self.align.no_stop_penalty, self.device)
            weight = torch.tensor([float(p < count) for p in positions], dtype=torch.float64, device=self.device)
            kl = (e.logprobs - e.ref_logprobs).sum(dim=1).double()
            sums += torch.stack([(v.double() * weight).sum() for v in
                                 (e.scores, kl, e.reply_lengths, e.stopped, torch.ones_like(e.scores))])
        engine.train()
        score, kl, length, stopped, n = (mean_over_ranks(sums) * world).tolist()
        if n == 0:
            return {}
        return {"val_reward_model_score": score / n, "val_kl": kl / n, "val_response_length": length / n,
                "val_stop_rate": stopped / n}

    def sample(self, engine, step: int) -> str | None:
        """The reply to the first val prompt (every rank runs it: ZeRO-3 needs all of them)."""
        if self.cfg.train.sample_tokens == 0:
            return None
        return reply_text(engine.module, self.dataset.tokenizer, self.val_prompts()[0], self.cfg.train.sample_tokens,
                          self.cfg.train.seed + step, self.lockstep)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.schedule.state_dict(self.step), "kl_controller": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.schedule.load_state_dict(state["loader"])
        self.kl.load_state_dict(state["kl_controller"])


def rollout_sums(b: Experience, kl_coef: float) -> torch.Tensor:
    """A micro-batch's sums (float64, ROLLOUT_SUMS order). Its tokens are prompt + reply, padding left out: a
    reply's first position + 1 is its prompt's length."""
    advantages, mask, scores = b.advantages.double(), b.mask.double(), b.scores.double()
    kl = b.kl.double().sum(dim=1)  # per reply
    values = [(advantages * mask).sum(), (advantages ** 2 * mask).sum(), mask.sum(), torch.ones_like(scores).sum(),
              scores.sum(), (scores - kl_coef * kl).sum(), kl.sum(), (b.entropy.double() * mask).sum(),
              b.stopped.double().sum(), (mask.sum(dim=1) + mask.argmax(dim=1) + 1).sum()]
    return torch.stack(values)
