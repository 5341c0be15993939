"""Tiny Shakespeare: download (sha256-checked) and prepare at char level, 90/10 split, as in nanoGPT."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from data_prep.prep import PrepSettings, prepare
from megagpt.errors import UserError

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def download_shakespeare(dest: Path) -> Path:
    """input.txt at dest (kept when already there and its sha256 matches)."""
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256:
        return dest
    try:
        with urllib.request.urlopen(URL, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"cannot download Tiny Shakespeare from {URL} ({e}); download it yourself and pass "
                        f"--input PATH/input.txt (or set data.source)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise UserError(f"{URL}: sha256 {digest} differs from the expected {SHA256}; pass a trusted copy "
                        f"with --input")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def prepare_shakespeare(out_dir: str | Path, input_path: str | Path | None = None, force: bool = False,
                        workers: int = 1) -> Path:
    """Char-level Tiny Shakespeare in out_dir: 65-char vocabulary, first 90% train, last 10% val."""
    out_dir = Path(out_dir)
    if input_path is None:
        input_path = download_shakespeare(out_dir.parent / "tinyshakespeare_input.txt")
    if not Path(input_path).is_file():
        raise UserError(f"--input {input_path}: no such file")
    settings = PrepSettings(tokenizer="char", val_fraction=0.1, workers=workers)
    return prepare([input_path], out_dir, settings, force=force)
