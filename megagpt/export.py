"""`megagpt export`: a run's checkpoint (any ZeRO stage) as a standalone folder, megagpt or HF GPT-2."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch

from megagpt.config import Config, save_config
from megagpt.errors import UserError, refuse_file_in_the_way
from megagpt.hf_gpt2 import TIED, hf_config, hf_state_dict  # the GPT-2 layout, one mapping for both directions
from megagpt.inference import (
    EXPORT_MARKER,
    TOKENIZER_DIR,
    consolidated_state_dict,
    is_export_dir,
    is_run_dir,
    resolve_tag,
    run_config,
)
from megagpt.mup import fold_multipliers
from megagpt.reward_model import policy_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_main(args) -> int:
    out = export(Path(args.run_dir), Path(args.out), args.step, args.format, args.dtype,
                 force=getattr(args, "force", False))
    print(f"megagpt export: wrote {out}")
    return 0


def export(run_dir: Path, out: Path, step: int | None = None, fmt: str = "megagpt",
           dtype: str = "fp32", force: bool = False) -> Path:
    """Write the export into a temporary sibling of `out`, then rename it: a failed export leaves nothing."""
    run_dir, out = Path(run_dir), Path(out)
    if is_export_dir(run_dir):
        raise UserError(f"{run_dir}: an export dir already (from `megagpt export`); export the run dir it came "
                        f"from (its {EXPORT_MARKER} names it), or use this one as it is")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml here; expected a run dir written by `megagpt train`")
    if fmt not in ("megagpt", "hf"):
        raise UserError(f"--format {fmt!r}: expected megagpt or hf")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_out_dir(run_dir, out, force)
    tag = resolve_tag(run_dir, step)
    cfg = run_config(run_dir, tag)
    if fmt == "hf" and cfg.train.stage == "reward":
        raise UserError(f"--format hf: {run_dir} is a reward model (a GPT with a scalar head), which GPT-2's "
                        f"language-model folder cannot hold; export it with --format megagpt")
    state = consolidated_state_dict(run_dir, tag)
    if fmt == "hf" and cfg.train.stage == "ppo":
        state = policy_state(state)  # the language model; PPO's value model stays in the run
    state = {name: t.to(DTYPES[dtype]).contiguous() for name, t in state.items() if name != TIED}

    from safetensors import SafetensorError

    target = out.resolve()  # `--out .` has no name to put a sibling beside, nor a parent but itself
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{socket.gethostname()}-{os.getpid()}-",
                                dir=target.parent))
    try:
        _write(tmp, run_dir, state, cfg, fmt, dtype, tag)
        _move_into_place(tmp, target)
    except (OSError, SafetensorError) as e:  # a full disk, most often
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--out {out}: could not write the export ({e}); nothing was left there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_out_dir(run_dir: Path, out: Path, force: bool) -> None:
    """--out is neither the run dir, nor inside a run dir, nor around it; not empty only with --force over
    an earlier export (never over other files)."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run in target.parents or target in run.parents:
        where = "is" if target == run else "is inside" if run in target.parents else "contains"
        raise UserError(f"--out {out}: {where} the run dir {run_dir}; export to a folder of its own")
    for folder in [target, *target.parents]:  # another run's dir
        if is_run_dir(folder):
            where = "is" if folder == target else "is inside"
            raise UserError(f"--out {out}: {where} the run dir {folder}; export to a folder of its own")
    refuse_file_in_the_way(target, f"--out {out}", "export to a folder")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise UserError(f"--out {out}: is not empty; pass --force to replace an earlier export there, or "
                            f"choose another folder")
        if not (target / EXPORT_MARKER).is_file():
            raise UserError(f"--out {out}: is not empty and holds no earlier export ({EXPORT_MARKER}); --force "
                            f"only replaces an export: choose another folder")


def _write(folder: Path, run_dir: Path, state, cfg: Config, fmt: str, dtype: str, tag: str) -> None:
    if fmt == "hf":
        _save(hf_state_dict(fold_multipliers(state, cfg.model), cfg), folder / "model.safetensors")  # µP folded
        config = hf_config(cfg, dtype, **special_token_ids(run_dir / TOKENIZER_DIR, cfg.model.vocab_size))
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        _save(state, folder / "model.safetensors")
        save_config(cfg, folder / "config.yaml")
    if (run_dir / TOKENIZER_DIR).is_dir():
        shutil.copytree(run_dir / TOKENIZER_DIR, folder / TOKENIZER_DIR)
    source = {"run_dir": str(run_dir.resolve()), "checkpoint": tag, "format": fmt, "dtype": dtype}
    (folder / EXPORT_MARKER).write_text(json.dumps(source, indent=1) + "\n")  # last: marks a finished export


def special_token_ids(tokenizer_dir: Path, vocab_size: int) -> dict[str, int | None]:
    """GPT2Config's bos/eos ids from the run's tokenizer: end of text starts and ends a document (GPT-2's
    convention), a chat model's generation ends at its end-of-turn token; None for what the vocabulary lacks."""
    from megagpt.chat_template import END, chat_token_ids
    from megagpt.dataset import load_tokenizer

    if not tokenizer_dir.is_dir():
        return {"bos_token_id": None, "eos_token_id": None}
    tokenizer = load_tokenizer(tokenizer_dir)
    chat = chat_token_ids(tokenizer)
    eos = chat[END] if chat else tokenizer.eos_id
    return {"bos_token_id": _in_vocab(tokenizer.eos_id, vocab_size), "eos_token_id": _in_vocab(eos, vocab_size)}


def _in_vocab(token_id: int | None, vocab_size: int) -> int | None:
    return token_id if token_id is not None and 0 <= token_id < vocab_size else None


def _umask() -> int:
    mask = os.umask(0)  # reading the umask sets it: put it straight back
    os.umask(mask)
    return mask


def _partial_prefix(out: Path) -> str:
    """An export in progress is `.<out>.partial-<host>-<pid>-<random>` beside `out`."""
    return f".{out.name}.partial-"


def _remove_abandoned(out: Path) -> None:
    """Partial exports beside `out` whose process is gone (a kill -9, a lost node): this host's, by their pid."""
    host = socket.gethostname()
    for folder in out.parent.glob(f"{glob.escape(_partial_prefix(out))}*"):
        owner = folder.name.removeprefix(_partial_prefix(out)).rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"megagpt export: removed {folder}, left by an export that was killed", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _move_into_place(tmp: Path, out: Path) -> None:
    """rename(2) replaces an empty folder; an earlier export (--force) is moved aside first, then deleted."""
    tmp.chmod(0o777 & ~_umask())  # mkdtemp made it private; a plain mkdir would follow the umask
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old / out.name, out)  # the earlier export goes back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})  # transformers refuses files without "format"
    path.chmod(0o666 & ~_umask())  # safetensors creates it 0600; colleagues on a shared file system read exports
