"""The `megagpt` command: one table of subcommands, one dispatch path, one error handler.

Every subcommand is a `main(argv) -> int` of the module that owns it; this file maps the words a user types to
those functions and turns every mistake a user can fix into one line on stderr with exit code 2. It is the only
module of megagpt/ that may import data_prep (data flows one way: data_prep writes datasets, megagpt reads them).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import shutil
import sys
import time
from pathlib import Path

from megagpt.errors import UserError

# Words -> "module:function"; the function takes the remaining arguments and returns the exit code.
COMMANDS = {
    ("prep",): "data_prep.cli:main",
    ("prep", "shakespeare-prefs"): "megagpt.cli:shakespeare_prefs_main",
    ("data", "verify"): "megagpt.dataset:verify_main",
    ("train",): "megagpt.cli:train_main",
    ("sample",): "megagpt.cli:sample_main",
    ("export",): "megagpt.cli:export_main",
    ("chat",): "megagpt.chat:main",
    ("eval", "qa"): "megagpt.eval_qa:main",
    ("eval", "prefs"): "megagpt.eval_prefs:main",
    ("plan",): "megagpt.plan:main",
    ("doctor",): "megagpt.doctor:main",
    ("mup", "coord-check"): "megagpt.cli:coord_check_main",
    ("sweep",): "megagpt.sweep:sweep_main",
    ("scaling", "fit"): "megagpt.scaling:fit_main",
    ("scaling", "predict"): "megagpt.scaling:predict_main",
    ("bench", "kernels"): "kernels.bench:main",
    ("bench", "data"): "benchmarks.data:main",
    ("bench", "train"): "benchmarks.train:main",
    ("bench", "syncs"): "benchmarks.syncs:main",
    ("bench", "val"): "benchmarks.val:main",
}
HELP = {
    "prep": "corpus -> tokenizer -> webdataset shards (megagpt prep {char,sentencepiece,shakespeare,chat,"
            "shakespeare-qa,preferences,shakespeare-prefs} -h)",
    "data": "megagpt data verify DIR: read every shard in full and check it against the manifest",
    "train": "train (bare, under torchrun, the deepspeed launcher or Slurm)",
    "sample": "generate text from a run dir, an export dir or a Hugging Face GPT-2 folder",
    "export": "consolidate a run's checkpoint into a standalone folder",
    "chat": "talk to a fine-tuned model (megagpt chat RUN_DIR [--prompt TEXT])",
    "eval": "evaluations: megagpt eval qa RUN_DIR --data DIR | megagpt eval prefs RUN_DIR... --out FILE.json",
    "plan": "what fits on your GPUs and how fast it runs",
    "doctor": "check this machine: versions, devices, a collective, the kernels, 20 training steps ([--full] on a GPU)",
    "mup": "µP: megagpt mup coord-check CONFIG --widths 64,128,... --out DIR",
    "sweep": "train every point of a grid (resumable): megagpt sweep CONFIG --grid KEY=V1,V2 ... --out DIR",
    "scaling": "scaling laws: megagpt scaling fit DIR... --out DIR | megagpt scaling predict FIT CONFIG",
    "bench": "benchmarks: megagpt bench kernels|data|train|syncs|val ...",
}


def _left_to_local_rank_0(error: Exception) -> bool:
    """A config error is the same on every rank of a node (one config file, one filesystem): under a launcher
    only local rank 0 prints it, so 8 ranks give one line, not 8. Other errors (a shard, a path) may be one
    rank's own and are printed by every rank that meets them."""
    from megagpt.config import ConfigError
    from megagpt.distributed import read_dist_env

    return isinstance(error, ConfigError) and read_dist_env().local_rank != 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = next((w for w in sorted(COMMANDS, key=len, reverse=True) if tuple(argv[: len(w)]) == w), None)
    if words is None:
        return _usage(argv)
    name = " ".join(words)
    module_name, function = COMMANDS[words].split(":")
    try:
        return getattr(importlib.import_module(module_name), function)(argv[len(words):])
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if not _left_to_local_rank_0(e):
            print(f"megagpt {name}: error: {e}", file=sys.stderr)  # bad config, data or paths: one line
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"megagpt {name}: error: {_disk_full(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (once it has, Ctrl-C saves and exits 0)
        print(f"\nmegagpt {name}: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The `megagpt` command and `python -m megagpt`: main's exit code, after leaving the process group a command
    made (left to interpreter shutdown, a rank that stops early, e.g. on a refused config, can end in SIGABRT from
    gloo's threads instead of its exit code). Only here: a process that calls main again needs its group."""
    code = main()
    if "torch" in sys.modules:
        from megagpt.distributed import leave_process_group

        leave_process_group()
    sys.exit(code)


def _disk_full(e: OSError) -> str:
    where = Path(e.filename or ".")
    folder = next((p for p in [where, *where.parents] if p.is_dir()), Path("."))
    free = shutil.disk_usage(folder).free
    return f"{e.strerror} writing {where} ({free / 2**20:.1f} MiB free there): free some space and run it again"


def _usage(argv: list[str]) -> int:
    """`-h` and `--version` answered; no command: the list of commands; a mistyped one: one line, with the
    nearest command where one is close."""
    lines = [f"  {word:<8} {text}" for word, text in HELP.items()]
    usage = "usage: megagpt COMMAND ...  (each takes -h)\n\ncommands:\n" + "\n".join(lines)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if argv[:1] == ["--version"]:
        from megagpt import __version__

        print(f"megagpt {__version__}")
        return 0
    if not argv:
        print(f"{usage}\n\nmegagpt: error: no command given", file=sys.stderr)
        return 2
    if argv[0] in _groups() and argv[1:2] in (["-h"], ["--help"]):
        commands = [" ".join(words) for words in COMMANDS if words[0] == argv[0]]
        print(f"usage: megagpt {argv[0]} COMMAND ...  (each takes -h)\n\n{HELP[argv[0]]}\n\ncommands:\n"
              + "\n".join(f"  megagpt {command}" for command in commands))
        return 0
    print(f"megagpt: error: {_unknown(argv)} (megagpt -h lists the commands)", file=sys.stderr)
    return 2


def _groups() -> set[str]:
    """The first words that only name a group of commands (`bench`, `eval`), not a command of their own."""
    return {words[0] for words in COMMANDS if len(words) > 1 and (words[0],) not in COMMANDS}


def _unknown(argv: list[str]) -> str:
    """What is wrong with the first words of argv, and the command nearest to them."""
    groups = _groups()
    typed = argv[:2] if argv[0] in groups else argv[:1]
    known = [" ".join(words) for words in COMMANDS if words[0] == argv[0]] if argv[0] in groups else list(HELP)
    near = difflib.get_close_matches(" ".join(typed), known, n=1)
    hint = f": did you mean '{near[0]}'?" if near else ""
    if argv[0] in groups and len(typed) == 1:
        return f"'{argv[0]}' needs one of: {', '.join(known)}"
    return f"unknown command '{' '.join(typed)}'{hint}"


# ---------------------------------------------------------------- train


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megagpt train", description=HELP["train"])
    p.add_argument("config", help="YAML config, e.g. configs/shakespeare_char_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--run-dir", help="where config, metrics, tb/ and checkpoints go (default runs/NAME: the "
                   "config's `name:`, else its file's name without .yaml)")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from the run dir's latest good checkpoint; never; or a checkpoint tag dir")
    p.add_argument("--check-ranks", type=int, metavar="N", help="only check CONFIG and the overrides for N ranks "
                   "and exit (launch/torchrun.sh runs it before starting any rank)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)

    from megagpt.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.check_ranks is not None:
        if args.check_ranks < 1:
            raise UserError(f"--check-ranks {args.check_ranks}: must be at least 1")
        from megagpt.ds_config import grad_accum_steps  # the batch must divide over the ranks (no torch imported)

        grad_accum_steps(cfg.train, cfg.model.block_size, args.check_ranks)
        return 0
    from megagpt.train import train

    prepare_known_dataset(Path(cfg.data.dataset_dir))
    train(cfg, args.run_dir, args.resume)
    return 0


# Datasets `megagpt train` prepares itself when its config points at them and they are missing, keyed by the
# dataset dir's name: the README's first command then needs nothing else (and no network).
KNOWN_DATASETS = {"shakespeare_char": "Tiny Shakespeare, char level (shipped inside megagpt)"}
PREPARE_WAIT_S = 1800


def prepare_known_dataset(dataset_dir: Path) -> None:
    """Rank 0 prepares a known dataset that is missing; the other ranks wait for its manifest to appear."""
    from megagpt.dataset import MANIFEST
    from megagpt.distributed import read_dist_env

    if (dataset_dir / MANIFEST).is_file() or dataset_dir.name not in KNOWN_DATASETS:
        return  # present, or unknown: the trainer says how to prepare it
    if read_dist_env().is_main:
        import data_prep

        print(f"megagpt: preparing {KNOWN_DATASETS[dataset_dir.name]} into {dataset_dir}", file=sys.stderr)
        data_prep.prepare_shakespeare(dataset_dir)
        return
    deadline = time.monotonic() + PREPARE_WAIT_S
    while not (dataset_dir / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise UserError(f"{dataset_dir}: rank 0 did not finish preparing it within {PREPARE_WAIT_S} s")
        time.sleep(1)


def coord_check_main(argv: list[str]) -> int:
    """`megagpt mup coord-check`, a missing known dataset prepared first as `megagpt train` does."""
    from megagpt.mup import coord_check_main as run

    return run(argv, prepare_known_dataset)


def shakespeare_prefs_main(argv: list[str]) -> int:
    """`megagpt prep shakespeare-prefs`: megagpt samples and labels the pairs, data_prep writes the dataset (only
    this module may import both)."""
    from data_prep.out_dir import work_dir_for
    from data_prep.preferences import PreferenceSettings, prepare_preferences
    from data_prep.shakespeare_qa import TRAIN_FRACTION, play_text
    from megagpt.shakespeare_prefs import main

    def training_text() -> str:
        text = play_text()
        return text[:int(len(text) * TRAIN_FRACTION)]

    def prepare(source, out, tokenizer_dir, val_fraction, seed, force, extra, extra_files):
        settings = PreferenceSettings(val_fraction=val_fraction, seed=seed)
        return prepare_preferences([source], out, tokenizer_dir, settings, force=force, extra_settings=extra,
                                   extra_files=extra_files)

    return main(argv, training_text, prepare, work_dir_for)


# ---------------------------------------------------------------- sample and export


def sample_main(argv: list[str]) -> int:
    from megagpt.generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_K

    p = argparse.ArgumentParser(prog="megagpt sample", description=HELP["sample"])
    p.add_argument("path", help="RUN_DIR, EXPORT_DIR or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", default="\n", help="text to continue (empty: start from EOS)")
    p.add_argument("--max-new-tokens", type=int, default=500, help=">= 1")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help=">= 0 (0: greedy)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=">= 1")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1]")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1, help=">= 1")
    p.add_argument("--step", type=int, help="checkpoint step of a run dir (default: latest)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each token")
    from megagpt.sample import sample_main as run

    return run(p.parse_args(argv))


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megagpt export", description=HELP["export"])
    p.add_argument("run_dir", help="RUN_DIR of any stage, trained under any ZeRO stage")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="a new or empty directory outside the run dir")
    p.add_argument("--format", choices=["megagpt", "hf"], default="megagpt",
                   help="megagpt: model.safetensors, config.yaml, tokenizer/ (default); hf: a Hugging Face GPT-2 "
                   "folder that transformers loads (not for a reward model)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the weights' dtype (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out (never other files)")
    from megagpt.export import export_main as run

    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
