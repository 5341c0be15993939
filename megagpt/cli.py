"""The `megagpt` command: parses arguments and hands each subcommand to the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

from megagpt.errors import UserError

# Subcommands that hand their remaining arguments to another module's `main(argv) -> int`.
FORWARDED = {
    ("prep",): "data_prep.cli:main",
    ("plan",): "megagpt.plan:main",
    ("bench", "kernels"): "kernels.bench:main",
    ("bench", "data"): "data_prep.bench:main",
    ("bench", "train"): "megagpt.bench_train:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, target in FORWARDED.items():
        if tuple(argv[: len(words)]) == words:
            return _forward(" ".join(words), target, argv[len(words) :])
    if argv[:1] == ["bench"]:
        print("usage: megagpt bench {kernels,data,train} ...  (each takes -h)", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, FileNotFoundError) as e:  # bad config, data or paths: one line, no traceback
        print(f"megagpt {args.command}: error: {e}", file=sys.stderr)
        return 2


def _forward(name: str, target: str, rest: list[str]) -> int:
    module_name, func = target.split(":")
    try:
        return getattr(importlib.import_module(module_name), func)(rest)
    except UserError as e:
        print(f"megagpt {name}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagpt", description="GPT pre-training on DeepSpeed, CPU to many nodes."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, text in [
        ("prep", "corpus -> tokenizer -> webdataset shards (see `megagpt prep -h`)"),
        ("plan", "what fits on your GPUs and how fast it runs (see `megagpt plan -h`)"),
        ("bench", "benchmarks: megagpt bench kernels|data|train ..."),
    ]:
        sub.add_parser(name, help=text, add_help=False)

    t = sub.add_parser("train", help="train (bare, under torchrun, the deepspeed launcher or Slurm)")
    t.add_argument("config", help="YAML config, e.g. configs/shakespeare_char_cpu.yaml")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    t.add_argument(
        "--run-dir", help="where config, metrics, tb/ and checkpoints go (default runs/<config name>)"
    )
    t.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from the run dir's latest good checkpoint; never; or a checkpoint tag dir",
    )
    t.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # the deepspeed launcher adds it
    t.set_defaults(run=_run_train)

    s = sub.add_parser("sample", help="generate text from a run dir or an export dir")
    s.add_argument("path", help="RUN_DIR or EXPORT_DIR")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--step", type=int, help="checkpoint step of a run dir (default: latest)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole context each token")
    s.set_defaults(run=_run_sample)

    e = sub.add_parser("export", help="consolidate a run's checkpoint into a standalone folder")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    e.add_argument("--out", required=True)
    e.add_argument("--format", choices=["megagpt", "hf"], default="megagpt")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    e.set_defaults(run=_run_export)
    return p


def _run_train(args) -> int:
    from megagpt.config import load_config
    from megagpt.train import train

    train(load_config(args.config, args.overrides), args.run_dir, args.resume)
    return 0


def _run_sample(args) -> int:
    from megagpt.sample import sample_main

    return sample_main(args)


def _run_export(args) -> int:
    from megagpt.export import export_main

    return export_main(args)


if __name__ == "__main__":
    sys.exit(main())
