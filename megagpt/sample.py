"""`megagpt sample`: text from a run dir, an export dir or a GPT-2 folder, seeded and reproducible; every argument
checked first."""

from __future__ import annotations

import math
import os
import signal
import sys

import torch

from megagpt.errors import UserError, check_seed
from megagpt.generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, generate, prompt_ids
from megagpt.inference import load_for_inference


def check_sampling_args(
    num_samples: int = 1,
    max_new_tokens: int = 1,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    seed: int = 0,
) -> None:
    """A one-line UserError, named as the command-line flag, for the first argument out of range."""
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be at least 1")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not (temperature >= 0 and math.isfinite(temperature)):  # also false for NaN
        raise UserError(f"--temperature {temperature}: must be a finite number >= 0 (0: always the likeliest token)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1 (or left out)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    check_seed(seed)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; for a char vocabulary every character outside it is named in one line."""
    if tokenizer.kind == "char":
        known = set(tokenizer.chars)
        unknown = list(dict.fromkeys(c for c in prompt if c not in known))  # in order of appearance, once each
        if unknown:
            shown = " ".join(repr(c) for c in unknown)
            raise UserError(f"--prompt: {len(unknown)} character{'s' * (len(unknown) > 1)} not in the model's "
                            f"char vocabulary: {shown}")
    return prompt_ids(tokenizer, prompt)


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu or cuda (or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected cpu or cuda (or cuda:N)")
    return device


def sample_texts(
    path,
    prompt: str,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    seed: int = 1337,
    step: int | None = None,
    device: str | None = None,
    use_cache: bool = True,
) -> list[str]:
    check_sampling_args(num_samples, max_new_tokens, temperature, top_k, top_p, seed)
    device = resolve_device(device)
    model, tokenizer, cfg = load_for_inference(path, step, device)
    if cfg.train.stage == "reward":
        raise UserError(f"{path}: a reward model (train.stage: reward) scores text and does not generate it; "
                        f"sample a language model's run (pretrain, sft, dpo or ppo)")
    ids = encode_prompt(tokenizer, prompt)
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, progress=True)
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
    try:
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- sample {i + 1} ---")
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`megagpt sample RUN | head`): end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        return 128 + signal.SIGPIPE  # what a shell reports for a writer that SIGPIPE ended
    return 0
