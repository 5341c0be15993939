"""GPT with a scalar head: the reward model, and PPO's policy with its value model beside it.

RewardModel is the GPT backbone (megagpt/model.py, unchanged) whose vocabulary projection is replaced by a
linear head to one number per position: r(x)_t = w · h_t + b, with h_t the final (normed) hidden state. As a
reward model it is read at a completion's last token, its end-of-turn (`read_scores`); as PPO's value model
every position's number is V(s_t). Its state dict is the GPT's (without the tied `lm_head.weight`, which it no
longer uses) plus `score.weight` and `score.bias`, so it initialises from any GPT state dict: `train.init_from`
an SFT run loads the backbone and leaves the head at its init (zero: every score starts at 0).

PolicyWithValue is the policy GPT itself (its parameter names are a plain GPT's, so a PPO run samples, chats,
exports and evaluates like any run) with a RewardModel as the submodule `value`: one module, hence one DeepSpeed
engine, one optimizer over both, one checkpoint (TRL's PPO trains its PolicyAndValueWrapper the same way).
Its forward returns (logits, values) where GPT's returns (logits, loss); with a KV cache (generation) the values
are None and only the policy runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.config import ModelConfig
from megagpt.errors import UserError
from megagpt.model import GPT

TIED = "lm_head.weight"
HEAD = ("score.weight", "score.bias")
VALUE_PREFIX = "value."


class ScoreHead(nn.Linear):
    """nn.Linear to one number, computed in fp32 from 16-bit weights and hidden states: a bf16 output keeps 8
    bits, and the Bradley-Terry loss (blind to a common offset, which drifts) and GAE (V_{t+1} - V_t) read
    differences of scores (bf16's step at a score of 100 is 0.5). Its own forward, so ZeRO-3 gathers its weights."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class RewardModel(GPT):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.lm_head = nn.Identity()  # the backbone's forward now ends at the hidden states: (B, T, C)
        self.score = ScoreHead(cfg.n_embd, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, idx, targets=None, cache=None):
        """(scores (B, T) in fp32, None): the head at every position."""
        if cache is not None or targets is not None:
            raise UserError("a reward model scores text; it does not generate or predict tokens (load a policy "
                            "run for that)")
        hidden, _ = super().forward(idx)  # (B, T, C)
        return self.score(hidden).squeeze(-1), None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Its own state dict as usual; a plain GPT's (train.init_from) loads the backbone, the head stays."""
        state = {k: v for k, v in state_dict.items() if k != TIED}
        if strict and not any(k in state for k in HEAD):
            own = self.state_dict()
            state.update({k: own[k] for k in HEAD})
        return super().load_state_dict(state, strict=strict, assign=assign)


def read_scores(scores: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """scores (B, T), last (B,) index of each row's last token -> (B,) the score there."""
    return scores.gather(1, last.to(scores.device)[:, None]).squeeze(1)


class PolicyWithValue(GPT):
    def __init__(self, cfg: ModelConfig, value_cfg: ModelConfig):
        super().__init__(cfg)
        self.value = RewardModel(value_cfg)

    def forward(self, idx, targets=None, cache=None):
        """(logits (B, T, V), values (B, T)); (logits, None) with a cache or targets (a plain GPT's call)."""
        logits, loss = super().forward(idx, targets, cache)
        if cache is not None or targets is not None:
            return logits, loss
        return logits, self.value(idx)[0]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Its own state dict as usual; a plain GPT's (train.init_from) loads the policy, the value stays."""
        state = dict(state_dict)
        if strict and not any(k.startswith(VALUE_PREFIX) for k in state):
            state.update({VALUE_PREFIX + k: v for k, v in self.value.state_dict().items()})
        return super().load_state_dict(state, strict=strict, assign=assign)


def policy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PPO run's weights without the value model: the policy, a plain GPT's state dict."""
    return {k: v for k, v in state.items() if not k.startswith(VALUE_PREFIX)}


def inference_model(cfg, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module to load a run's (or export's) weights into for inference, and the weights it takes: the reward
    model for `train.stage: reward`, the policy alone for `ppo`, else the GPT."""
    if cfg.train.stage == "reward":
        return RewardModel(cfg.model), state
    if cfg.train.stage == "ppo":
        return GPT(cfg.model), policy_state(state)
    return GPT(cfg.model), state
