"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from megagpt.model import GPT, KVCache

# The sampling defaults of `megagpt sample`, `megagpt chat` and the samples written during training.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 200


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt starts from EOS (id 0 in a vocabulary without one)."""
    return tokenizer.encode(prompt) or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; the rest get -inf."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens. Once the context outgrows block_size, positions shift every step,
    so (with learned absolute positions) the cache cannot be reused: each step then recomputes the window."""
    was_training = model.training
    model.eval()
    block_size = model.cfg.block_size
    cache, fed = None, 0  # fed: how many tokens of idx the cache already holds
    for _ in range(max_new_tokens):
        if use_cache and idx.size(1) <= block_size:
            if cache is None:
                cache, fed = KVCache(model.cfg.n_layer), 0
            logits, _ = model(idx[:, fed:], cache=cache)
            fed = idx.size(1)
        else:
            logits, _ = model(idx[:, -block_size:])
        logits = logits[:, -1, :].float()
        if temperature <= 0:  # greedy
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat([idx, next_token.to(idx.device)], dim=1)
    model.train(was_training)
    return idx
