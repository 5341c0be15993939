"""`megagpt sample`: text from a run dir or export dir, seeded and reproducible."""

from __future__ import annotations

import sys

import torch

from megagpt.generate import generate
from megagpt.inference import load_for_inference


def sample_texts(
    path,
    prompt: str,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int = 1337,
    step: int | None = None,
    device: str | None = None,
    use_cache: bool = True,
) -> list[str]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_for_inference(path, step, device)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)
    return [tokenizer.decode(row.tolist()) for row in out]


def sample_main(args) -> int:
    texts = sample_texts(
        args.path,
        args.prompt,
        args.max_new_tokens,
        args.num_samples,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.step,
        args.device,
        not args.no_cache,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(text + "\n")
    return 0
