"""The alignment objectives as tensor functions: Bradley-Terry, DPO, and PPO's pieces (KL-penalised rewards,
GAE, whitening, clipped policy and value losses, the KL controller). No models, no data, no DeepSpeed: the stages
in megagpt/stages/ call these, and tests/test_alignment.py and tests/test_ppo.py check them against float64
references. docs/alignment.md writes each formula once.

PPO's tensors are (B, T) over positions t of a row: position t holds the log-prob and value of the *action*
token at t + 1 (the logits at t predict it), and `mask` is 1 exactly on the positions whose action is a reply
token, a contiguous run ending at the reply's last token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- log-probabilities


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), tokens (B, T) -> log p(tokens) (B, T) in fp32 (any id where nothing is picked: -1 -> 0)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of log p(target) over the positions whose target is not -1: log π(reply | prompt) per row (B,)."""
    return (token_logprobs(logits, targets) * (targets != -1)).sum(dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each position's next-token distribution (B, T), in nats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- reward model and DPO


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log σ(r_chosen - r_rejected), the mean over pairs: the Bradley-Terry model's negative log-likelihood of
    the human choice."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen rewards, rejected rewards) from sequence log-probs (B,) of the policy and the reference.

    The implicit reward of a reply is β (log π(y|x) - log π_ref(y|x)); the loss is -log σ(reward_chosen -
    reward_rejected), the mean over pairs. The rewards come back detached (for logging)."""
    chosen = beta * (policy_chosen.float() - reference_chosen.float())
    rejected = beta * (policy_rejected.float() - reference_rejected.float())
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


# ---------------------------------------------------------------- PPO


def kl_penalised_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         scores: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B, T), KL per position (B, T)): r_t = -kl_coef (log π(a_t) - log π_ref(a_t)) on every reply
    position, plus the reward model's score (B,) on the last one."""
    kl = (logprobs - ref_logprobs) * mask
    last = last_positions(mask)
    rewards = -kl_coef * kl
    rewards[torch.arange(len(last), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """The index of each row's last masked position (B,)."""
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, -1).max(dim=1).values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) and 0 off the mask: generalised advantage estimation.

    δ_t = r_t + γ V_{t+1} - V_t (V after the last reply position is 0: the episode ends there),
    A_t = δ_t + γ λ A_{t+1}, returns R_t = A_t + V_t."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        inside = mask[:, t + 1] if t + 1 < T else torch.zeros_like(next_value)  # is t + 1 still in the reply?
        delta = rewards[:, t] + gamma * next_value * inside - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_advantage * inside
        next_value, next_advantage = values[:, t], advantages[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: float, var: float, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) on the mask, 0 elsewhere; mean and var are the batch's (all ranks')."""
    return (x - mean) / math.sqrt(var + eps) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate: mean over the mask of max(-A ρ, -A clip(ρ, 1-ε, 1+ε)), ρ = π/π_old; with the
    fraction of positions where the clipped term won, and the approximate KL ½ E[(log π - log π_old)²]."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½ mean over the mask of max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, -ε_v, ε_v); and the
    fraction of positions where the clipped term won."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


class KLController:
    """The KL penalty's coefficient: fixed, or adapted toward a target KL (Ziegler et al. 2019):
    β ← β (1 + clip(KL / target - 1, -0.2, 0.2) · n / horizon) after a batch of n replies with mean KL."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])  # target and horizon stay the config's: a user may change them
