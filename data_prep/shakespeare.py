"""Tiny Shakespeare: the copy shipped inside this package (sha256-checked), prepared at char level, 90/10 split."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from importlib import resources
from pathlib import Path

from data_prep.prep import PrepSettings, prepare
from megagpt.errors import UserError

SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # the uncompressed input.txt
# karpathy/char-rnn's data/tinyshakespeare/input.txt (1,115,394 bytes, public domain), `gzip -9 -n`: package data,
# so a wheel and an editable install both carry it and no path needs the network.
EMBEDDED = "corpora/tinyshakespeare.txt.gz"


def embedded_copy():
    """The shipped copy as an importlib.resources Traversable (a plain file in any ordinary install)."""
    return resources.files("data_prep").joinpath(EMBEDDED)


def check_embedded(copy) -> None:
    """UserError unless copy decompresses to the text whose sha256 is SHA256."""
    fix = "reinstall megagpt, or pass --input PATH/input.txt (data.source in a config)"
    try:
        text = gzip.decompress(copy.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{copy}: cannot read the embedded Tiny Shakespeare ({e}); {fix}") from None
    digest = hashlib.sha256(text).hexdigest()
    if digest != SHA256:
        raise UserError(f"{copy}: the embedded Tiny Shakespeare has sha256 {digest}, expected {SHA256}; {fix}")


def prepare_shakespeare(out_dir: str | Path, input_path: str | Path | None = None, force: bool = False,
                        workers: int = 1) -> Path:
    """Char-level Tiny Shakespeare in out_dir (65-char vocabulary, first 90% train, last 10% val), from
    input_path or, when it is None, from the embedded copy; the prep reads the .gz as it is, and gives the
    same shards as from the raw text."""
    settings = PrepSettings(tokenizer="char", val_fraction=0.1, workers=workers)
    if input_path is not None:
        if not Path(input_path).is_file():
            raise UserError(f"--input {input_path}: no such file")
        return prepare([input_path], out_dir, settings, force=force)
    copy = embedded_copy()
    check_embedded(copy)
    with resources.as_file(copy) as path:  # a temporary file only when installed as a zip
        return prepare([path], out_dir, settings, force=force)
