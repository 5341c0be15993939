"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded; one batch of equal-length prompts
(`generate`) or prompts of any lengths with a generator per row (`generate_replies`)."""

from __future__ import annotations

import torch
from tqdm import tqdm

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
    progress: bool = False,
) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens. Once the context outgrows block_size, positions shift every step,
    so (with learned absolute positions) the cache cannot be reused: each step then recomputes the window.
    `progress`: a bar of tokens on stderr where it is a terminal (none in logs and pipes)."""
    was_training = model.training
    model.eval()
    block_size = model.cfg.block_size
    cache, fed = None, 0  # fed: how many tokens of idx the cache already holds
    for _ in tqdm(range(max_new_tokens), desc="sample", unit="token", leave=False, disable=None if progress else True):
        if use_cache and idx.size(1) <= block_size:
            if cache is None:
                cache, fed = KVCache(model.cfg.n_layer), 0
            logits, _ = model(idx[:, fed:], cache=cache)
            fed = idx.size(1)
        else:
            logits, _ = model(idx[:, -block_size:])
        probs = sampling_probabilities(logits[:, -1, :].float(), temperature, top_k, top_p)
        if temperature <= 0:  # greedy
            next_token = probs.argmax(dim=-1, keepdim=True)
        else:
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat([idx, next_token.to(idx.device)], dim=1)
    model.train(was_training)
    return idx


@torch.no_grad()
def generate_replies(
    model: GPT,
    prompts: list[list[int]],
    caps: list[int],
    stop_id: int | None,
    generators: list[torch.Generator],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    lockstep: bool = False,
) -> list[tuple[list[int], bool]]:
    """Replies to prompts of any lengths in one batch with the KV cache: per row (its new tokens up to and
    including stop_id, whether stop_id came), at most caps[i] new tokens, each row sampled with its own
    generator. The same tokens as sampling each prompt alone with its generator (megagpt/chat.py stream_reply),
    up to float rounding: a row draws once from its generator per new token, from the same distribution.

    No padding (learned absolute positions): every row starts at position 0 and all rows advance one position
    per forward; the model is fed the rows' common prefix length at once, then one token per row per step, a
    row's next token being its prompt's while it is still in its prompt and sampled after. A finished row
    carries filler tokens that no other row attends to. Every row's prompt + cap must fit block_size.
    lockstep: a fixed number of forwards (block_size - 1, from a one-token prefill), whatever the prompts and
    however early the replies end (ZeRO-3: every forward is a collective, so every rank must run as many)."""
    lengths = [len(p) for p in prompts]
    block_size = model.cfg.block_size
    if min(lengths) < 1 or any(n + c > block_size for n, c in zip(lengths, caps, strict=True)):
        raise ValueError(f"every prompt needs at least 1 token and prompt + cap <= block_size={block_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    replies: list[list[int]] = [[] for _ in prompts]
    done = [c == 0 for c in caps]
    stopped = [False] * len(prompts)
    start = 1 if lockstep else min(lengths)
    end = block_size if lockstep else max(n + c for n, c in zip(lengths, caps, strict=True))
    cache = KVCache(model.cfg.n_layer)
    logits, _ = model(torch.tensor([p[:start] for p in prompts], device=device), cache=cache)
    for t in range(start, end):  # t: the position whose token every row picks now
        probs = sampling_probabilities(logits[:, -1, :].float(), temperature, top_k, top_p)  # (B, V)
        column = []
        for i, prompt in enumerate(prompts):
            if t < lengths[i]:
                column.append(prompt[t])
            elif done[i]:
                column.append(prompt[0])  # filler: nothing reads it
            else:
                token = draw_token(probs[i:i + 1], temperature, generators[i])
                replies[i].append(token)
                stopped[i] = token == stop_id
                done[i] = stopped[i] or len(replies[i]) == caps[i]
                column.append(token)
        if t + 1 == end or (all(done) and not lockstep):
            break
        logits, _ = model(torch.tensor(column, device=device)[:, None], cache=cache)
    model.train(was_training)
    return list(zip(replies, stopped, strict=True))


def sampling_probabilities(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """(B, V) the sampling distribution of each row (the logits themselves when greedy: temperature <= 0).
    The largest logit is shifted to 0 before dividing by the temperature, so a temperature near 0 (1e-40, or
    below float32's smallest normal, which it is raised to) sends the others to -inf, never to inf (NaN)."""
    if temperature <= 0:
        return logits
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = shifted / max(temperature, torch.finfo(logits.dtype).tiny)
    return torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)


def draw_token(probs: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """One token from a (1, V) row of sampling_probabilities: generate_replies' rows and megagpt/chat.py's
    replies draw it alike (the same generator call)."""
    if temperature <= 0:
        return int(probs.argmax(dim=-1))
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
