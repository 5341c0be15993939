"""`megagpt bench val`: trained models scored side by side on the same windows, megagpt runs and nanoGPT checkpoints.

Every non-overlapping window of `--block-size` tokens (+1 for the targets) of a nanoGPT `val.bin`, in order, the
same windows for every model: no sampling noise between them (a training run's own val loss is an estimate from a
sample of windows, nanoGPT's a fresh random one at each evaluation). nanoGPT's char ids are checked against each
megagpt run's vocabulary (its `meta.pkl` beside `val.bin`), so both read the same text.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch

from megagpt.config import ModelConfig
from megagpt.errors import UserError
from megagpt.model import GPT

NANOGPT_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt bench val", description=__doc__)
    p.add_argument("models", nargs="+", metavar="MODEL", help="a megagpt run or export dir, or a nanoGPT ckpt.pt")
    p.add_argument("--val-bin", required=True, type=Path, help="nanoGPT's data/shakespeare_char/val.bin")
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.block_size < 1:
        raise UserError(f"--block-size {args.block_size}: must be at least 1")
    tokens, chars = read_val_bin(args.val_bin)
    if len(tokens) <= args.block_size:
        raise UserError(f"--val-bin {args.val_bin}: {len(tokens)} tokens, too few for one window of --block-size "
                        f"{args.block_size} (+1 for the targets)")
    print(f"{'model':60s} {'windows':>8s} {'val loss':>9s}")
    for path in args.models:
        model = load_model(Path(path), chars)
        check_fits(path, model, tokens, args.block_size)
        loss, windows = score(model, tokens, args.block_size)
        print(f"{path:60s} {windows:8d} {loss:9.4f}")
    return 0


def read_val_bin(path: Path) -> tuple[torch.Tensor, str | None]:
    """The uint16 ids of val.bin and, when meta.pkl is beside it, the characters they stand for in id order."""
    if not path.is_file():
        raise UserError(f"--val-bin {path}: no such file")
    if path.stat().st_size % 2:
        raise UserError(f"--val-bin {path}: {path.stat().st_size} bytes, not a whole number of uint16 ids "
                        f"(nanoGPT's prepare.py writes 2 bytes per id)")
    tokens = torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))
    meta = path.with_name("meta.pkl")
    if not meta.is_file():
        return tokens, None
    try:
        itos = pickle.loads(meta.read_bytes())["itos"]
        return tokens, "".join(itos[i] for i in range(len(itos)))
    except Exception as e:  # noqa: BLE001  any unpickling failure means the same thing: not nanoGPT's meta.pkl
        raise UserError(f"{meta}: not nanoGPT's meta.pkl (a pickled dict whose itos maps 0..n-1 to characters): "
                        f"{type(e).__name__}: {e}") from None


def check_fits(path: str, model: GPT, tokens: torch.Tensor, block_size: int) -> None:
    """The model reads windows of block_size and knows every id of val.bin."""
    if block_size > model.cfg.block_size:
        raise UserError(f"--block-size {block_size}: longer than {path}'s model.block_size {model.cfg.block_size}")
    if int(tokens.max()) >= model.cfg.vocab_size:
        raise UserError(f"--val-bin: id {int(tokens.max())} is outside {path}'s vocabulary of "
                        f"{model.cfg.vocab_size}: a val.bin of another tokenizer")


def load_model(path: Path, chars: str | None) -> GPT:
    """A nanoGPT ckpt.pt (its model_args and state dict) or a megagpt run/export dir (vocabulary checked)."""
    if path.suffix == ".pt":
        return load_nanogpt(path)
    from megagpt.inference import load_for_inference

    model, tokenizer = load_for_inference(path)[:2]
    if chars is not None and tokenizer.decode(list(range(len(chars)))) != chars:
        raise UserError(f"{path}: its vocabulary differs from the val.bin's meta.pkl: the ids mean other characters")
    return model


def load_nanogpt(path: Path) -> GPT:
    """A nanoGPT ckpt.pt: its model_args and its (maybe torch.compile'd) state dict; a UserError naming the file
    for anything else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        shape = {k: ckpt["model_args"][k] for k in NANOGPT_SHAPE_KEYS}
        model = GPT(ModelConfig(**shape, dropout=0.0))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001  unpickling, a missing key, a shape: all mean "not nanoGPT's ckpt.pt"
        raise UserError(f"{path}: not a nanoGPT ckpt.pt (model_args and model): {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return model


@torch.no_grad()
def score(model: GPT, tokens: torch.Tensor, block_size: int, batch: int = 64) -> tuple[float, int]:
    """Mean next-token loss over every non-overlapping window of block_size (+1) tokens; (loss, windows)."""
    model.eval()
    starts = range(0, len(tokens) - block_size, block_size)  # a window is block_size + 1 tokens
    total = 0.0
    for i in range(0, len(starts), batch):
        first = starts[i:i + batch]
        x = torch.stack([tokens[s:s + block_size] for s in first])
        y = torch.stack([tokens[s + 1:s + block_size + 1] for s in first])
        total += model(x, y)[1].double().item() * len(first)
    return total / len(starts), len(starts)
