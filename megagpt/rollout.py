"""PPO's experience: replies sampled from the policy with the KV cache, and the per-position tensors of one
micro-batch that the update reads (log-probs of the policy and the reference, values, the reward model's score).

A rank's prompts are sampled together, in one batch (megagpt/generate.py generate_replies), each with its own
generator seeded by its global position in the run's prompt schedule: a reply depends on nothing but (policy,
prompt, seed), up to float rounding the same as sampling that prompt alone, so it is the same on any number of
ranks, in any micro-batch, and after a resume. A reply ends with the end-of-turn token (kept: the reward model
reads its score there, and the policy learns to stop) or after max_new_tokens, capped so prompt + reply fits
block_size. Under ZeRO-3 every forward is a collective, so every rank runs the same number of forwards
(block_size - 1) instead of stopping when its replies end; the tokens are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megagpt.align_objectives import entropy, token_logprobs
from megagpt.chat_template import END, render, require_chat_tokens
from megagpt.generate import generate_replies
from megagpt.preference_data import completion_rows
from megagpt.reward_model import read_scores


def prompt_seed(seed: int, position: int, stream: int = 0) -> int:
    """The sampling seed of the prompt at a global position of the run's schedule (stream 0: training rollouts,
    1: evaluations)."""
    return int(np.random.SeedSequence([seed, stream, position]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_replies(model, prompts: list[list[int]], stop_id: int, max_new_tokens: int, temperature: float,
                   seeds: list[int], lockstep: bool = False) -> list[tuple[list[int], bool]]:
    """Per prompt (reply ids, the end-of-turn token included when it came; whether it came), sampled in one batch
    from the full distribution at `temperature`, prompt i with a generator seeded by seeds[i]; at most
    min(max_new_tokens, block_size - len(prompt)) tokens."""
    device = next(model.parameters()).device
    caps = [min(max_new_tokens, model.cfg.block_size - len(p)) for p in prompts]
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    return generate_replies(model, prompts, caps, stop_id, generators, temperature=temperature, lockstep=lockstep)


def sample_reply(model, prompt: list[int], stop_id: int, max_new_tokens: int, temperature: float, seed: int,
                 lockstep: bool = False) -> tuple[list[int], bool]:
    """One prompt's (reply ids, whether the end-of-turn came), as `sample_replies` samples it."""
    return sample_replies(model, [prompt], stop_id, max_new_tokens, temperature, [seed], lockstep)[0]


@dataclass
class Experience:
    """One micro-batch of B rollouts on the device. Positions t of (B, T) tensors hold the action token t + 1."""

    ids: torch.Tensor  # (B, T + 1) prompt + reply, right-padded with 0
    mask: torch.Tensor  # (B, T) 1.0 where the action is a reply token
    logprobs: torch.Tensor  # (B, T) log π_old(action), of logits / temperature
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(action)
    values: torch.Tensor  # (B, T) V_old(state before the action)
    scores: torch.Tensor  # (B,) the reward model's score at the reply's last token, minus any no-stop penalty
    stopped: torch.Tensor  # (B,) 1.0 when the reply ended with the end-of-turn token
    entropy: torch.Tensor  # (B, T) the rollout policy's entropy at each position
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def reply_lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def action_mask(prompt_lengths: list[int], reply_lengths: list[int], width: int) -> torch.Tensor:
    """(B, width): 1 on positions P-1 .. P+n-2, whose logits predict the reply's n tokens."""
    positions = torch.arange(width)[None, :]
    start = torch.tensor(prompt_lengths)[:, None] - 1
    end = start + torch.tensor(reply_lengths)[:, None]
    return ((positions >= start) & (positions < end)).float()


@torch.no_grad()
def experience(engine, reference, reward_model, prompts: list[list[int]], replies: list[list[int]],
               stopped: list[bool], temperature: float, no_stop_penalty: float, device) -> Experience:
    """The tensors of one micro-batch: one forward each of the policy with its value head (through the engine,
    in eval mode), the reference and the reward model."""
    ids, last = completion_rows([p + r for p, r in zip(prompts, replies, strict=True)])
    ids, last = ids.to(device), last.to(device)
    mask = action_mask([len(p) for p in prompts], [len(r) for r in replies], ids.size(1) - 1).to(device)
    targets = ids[:, 1:]
    logits, values = engine(ids)
    logits = logits[:, :-1].float() / temperature
    ref_logits = reference(ids)[0][:, :-1].float() / temperature
    stop = torch.tensor(stopped, dtype=torch.float32, device=device)
    scores = read_scores(reward_model(ids)[0], last).float() - no_stop_penalty * (1.0 - stop)
    return Experience(ids, mask, token_logprobs(logits, targets) * mask, token_logprobs(ref_logits, targets) * mask,
                      values[:, :-1].float() * mask, scores, stop, entropy(logits) * mask)


def reply_text(model, tokenizer, prompt: list[int], max_new_tokens: int, seed: int, lockstep: bool = False) -> str:
    """A sampled reply to a prompt, rendered as the conversation (an evaluation's sample text)."""
    reply, stopped = sample_reply(model, prompt, require_chat_tokens(tokenizer)[END], max_new_tokens, 1.0, seed,
                                  lockstep)
    return f"{render(tokenizer, [*prompt, *reply])}{'' if stopped else ' [no end-of-turn]'}\n"
