"""The frozen models of alignment: the reference policy (dpo, ppo) and the reward model (ppo), loaded on every
rank, in eval mode, without gradients, and never handed to an optimizer.

They are loaded at every start of a run, resumes included (a checkpoint holds only what trains): the reference
from `align.reference` (default `train.init_from`, the SFT model), the reward model from `align.reward_model`.

Under ZeRO 0-2 they are replicated on every rank (inference only, no optimizer state). Under ZeRO-3 each is
partitioned across the ranks like the policy, by a DeepSpeed ZeRO-3 engine without an optimizer (DeepSpeed-Chat
holds its reference and reward models the same way): a rank keeps 1/world of their weights, gathered layer by
layer during a forward, so models that would not fit replicated still run. Every rank must then run the same
forwards, which the stages do (every rank scores the same number of micro-batches).
"""

from __future__ import annotations

import torch

from megagpt.config import Config, ConfigError
from megagpt.dataset import Dataset
from megagpt.ds_config import frozen_model_config
from megagpt.model import GPT


def freeze(model: torch.nn.Module, device: torch.device, cfg: Config) -> torch.nn.Module:
    """The model in eval mode without gradients; under ZeRO-3 partitioned across the ranks (see above)."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.deepspeed.zero_stage != 3:
        return model
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=frozen_model_config(cfg))
    return engine.module.eval()  # its ZeRO-3 hooks gather each layer's weights for the forward


def reference_spec(cfg: Config) -> tuple[str, str]:
    """(the reference policy's path, the config key that names it)."""
    if cfg.align.reference:
        return cfg.align.reference, "align.reference"
    if not cfg.train.init_from:
        raise ConfigError(f"train.stage={cfg.train.stage} needs a reference policy: set train.init_from (the SFT "
                          f"model) or align.reference")
    return cfg.train.init_from, "train.init_from"


def load_reference(cfg: Config, dataset: Dataset, device: torch.device) -> GPT:
    """The reference policy, a GPT of the run's model shape and the data's tokenizer (vocabulary grown like the
    policy's)."""
    from megagpt.init_from import check_tokenizer, load_into, open_source

    spec, key = reference_spec(cfg)
    source = open_source(spec, key)
    for name, value in source.shape.items():
        mine = getattr(cfg.model, name)
        if name != "vocab_size" and mine != value:
            raise ConfigError(f"{key}={spec}: model.{name}={value!r} there, the policy has {mine!r}: the "
                              f"reference must have the policy's shape")
    check_tokenizer(source, dataset)  # else it would score token ids that mean other text to it, silently
    return freeze(load_into(GPT(cfg.model), source), device, cfg)


def load_reward_model(cfg: Config, dataset: Dataset, device: torch.device):
    """(the reward model, its config): a RewardModel that scores the policy's token ids (the data's tokenizer)."""
    from megagpt.inference import load_for_inference
    from megagpt.init_from import check_tokenizer, open_source, parse_spec
    from megagpt.reward_model import RewardModel

    spec = cfg.align.reward_model
    if not spec:
        raise ConfigError("train.stage=ppo needs align.reward_model: the run (or export) dir of a reward model "
                          "(train.stage: reward)")
    source = open_source(spec, "align.reward_model")  # a missing or wrong dir named by its key
    model, _, reward_cfg = load_for_inference(*parse_spec(spec), "cpu")
    if not isinstance(model, RewardModel):
        raise ConfigError(f"align.reward_model={spec}: a run of train.stage={reward_cfg.train.stage}, not a reward "
                          f"model (train.stage: reward)")
    if reward_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"align.reward_model={spec}: vocab_size {reward_cfg.model.vocab_size}, the policy's is "
                          f"{cfg.model.vocab_size}: both must read the same token ids (the same tokenizer)")
    if reward_cfg.model.block_size < cfg.model.block_size:
        raise ConfigError(f"align.reward_model={spec}: block_size {reward_cfg.model.block_size} is shorter than "
                          f"the policy's {cfg.model.block_size}: it could not score the longest replies")
    check_tokenizer(source, dataset)  # the same vocabulary size is not the same token ids
    return freeze(model, device, cfg), reward_cfg
