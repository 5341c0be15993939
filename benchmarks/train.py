"""`megagpt bench train`: steady-state training throughput of a config, beside a plain-torch nanoGPT-style loop."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megagpt.config import load_config, with_vocab_size
from megagpt.metrics import read_metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt bench train", description=__doc__)
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=200, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--baseline", action="store_true", help="also time a plain torch loop (nanoGPT-style)")
    p.add_argument("--baseline-only", action="store_true", help="time only the plain torch loop (for A/B runs)")
    p.add_argument("--json", dest="json_out", help="write the results here")
    args = p.parse_args(argv)

    results = {}
    if not args.baseline_only:
        results["megagpt"] = megagpt_tokens_per_sec(args.config, args.overrides, args.warmup, args.steps)
    if args.baseline or args.baseline_only:
        results["plain_torch"] = baseline_tokens_per_sec(args.config, args.overrides, args.warmup, args.steps)
    for name, r in results.items():
        print(f"{name:12s} {r['ms_per_step']:8.1f} ms/step  {r['tokens_per_sec']:>10,.0f} tokens/s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def megagpt_tokens_per_sec(config: str, overrides: list[str], warmup: int, steps: int) -> dict[str, float]:
    """The real trainer (DeepSpeed engine, loader, logging), with evaluation and checkpoints pushed out of the way."""
    from megagpt.train import train

    total = warmup + steps
    cfg = load_config(
        config,
        [
            *overrides,
            f"train.max_steps={total}",
            f"train.eval_interval={10 * total}",
            f"train.checkpoint_interval={10 * total}",
            "train.log_interval=1",
            "train.sample_tokens=0",
            "train.eval_steps=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(cfg, run_dir, resume="never")
        records = read_metrics(Path(run_dir))
    per_step = [r for r in records if "tokens_per_sec" in r][warmup:]
    tokens_per_step = summary.tokens_seen / summary.step
    seconds = [tokens_per_step / r["tokens_per_sec"] for r in per_step]
    median = statistics.median(seconds)
    return {"ms_per_step": 1000 * median, "tokens_per_sec": tokens_per_step / median}


def baseline_tokens_per_sec(config: str, overrides: list[str], warmup: int, steps: int) -> dict[str, float]:
    """nanoGPT's CPU loop on the same model and batch shape: AdamW (foreach), clip, random windows."""
    from megagpt.dataset import Dataset
    from megagpt.model import GPT

    cfg = load_config(config, overrides)
    cfg = with_vocab_size(cfg, Dataset(cfg.data.dataset_dir).vocab_size)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
    B, T = cfg.train.micro_batch_size, cfg.model.block_size
    data = torch.randint(0, cfg.model.vocab_size, (200_000,))
    seconds = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        ix = torch.randint(len(data) - T - 1, (B,))
        x = torch.stack([data[j : j + T] for j in ix])
        y = torch.stack([data[j + 1 : j + 1 + T] for j in ix])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"ms_per_step": 1000 * median, "tokens_per_sec": B * T / median}
