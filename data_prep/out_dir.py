"""A prep's output dir: checked before any work (exists, --force, a parent that is no folder), built in
`<out>.partial` beside it, and put in place whole.

`--force` replaces only a dataset dir (one with a manifest.json) or an empty folder: a typo such as `--out data`
must not delete a folder of other things. The old dataset is moved aside (into a hidden `.<out>.replaced-*`)
before the new one takes its name and removed after, so a kill in between leaves one of the two whole; the next
prep for that --out finishes such a swap and removes what was moved aside.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

from megagpt.dataset import MANIFEST
from megagpt.errors import UserError, file_in_the_way


def work_dir_for(out_dir: Path, force: bool) -> Path:
    """`<out>.partial`, once out_dir may be written: it does not exist (or --force may replace it), and its parent
    is a folder (made when missing)."""
    if out_dir.name in ("", ".."):  # ".", "..", "/": no name to build NAME.partial beside
        raise UserError(f"--out {out_dir}: name the dataset dir itself (e.g. --out ../NAME), not . or ..; it is "
                        f"built beside it as NAME.partial")
    _finish_interrupted_swap(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise UserError(f"--out {out_dir}: already exists; pass --force to replace it")
        if not (out_dir.is_dir() and ((out_dir / MANIFEST).is_file() or not any(out_dir.iterdir()))):
            raise UserError(f"--out {out_dir}: exists and is not a dataset dir (no {MANIFEST}); --force replaces "
                            f"only a dataset: pick another --out or remove it yourself")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        file = file_in_the_way(out_dir.parent)
        why = f"{file} is a file, not a folder" if file else e.strerror
        raise UserError(f"--out {out_dir}: cannot make its parent folder {out_dir.parent} ({why})") from None
    return out_dir.with_name(out_dir.name + ".partial")


def replace_out_dir(work: Path, out_dir: Path) -> None:
    """The finished work dir renamed to out_dir; an old out_dir (--force) moved aside first, removed after."""
    if not out_dir.exists():
        os.replace(work, out_dir)
        return
    aside = Path(tempfile.mkdtemp(prefix=_aside_prefix(out_dir), dir=out_dir.parent))  # a fresh name
    os.replace(out_dir, aside / out_dir.name)
    os.replace(work, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _aside_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.replaced-"


def _finish_interrupted_swap(out_dir: Path) -> None:
    """What a kill inside replace_out_dir left beside out_dir, put right: between its two renames (no out_dir, the
    old dataset aside, the finished `<out>.partial`) the new dataset takes its name; then (or after the second
    rename) what was moved aside is removed, instead of staying hidden with the old dataset's size."""
    work = out_dir.with_name(out_dir.name + ".partial")
    for aside in map(Path, glob.glob(glob.escape(str(out_dir.parent / _aside_prefix(out_dir))) + "*")):
        old = aside / out_dir.name
        if not out_dir.exists() and old.exists():
            finished = (work / MANIFEST).is_file()  # sealed before the swap began
            os.replace(work if finished else old, out_dir)
            print(f"megagpt prep: --out {out_dir}: finished replacing it, which a killed prep had left half done "
                  f"({'the new dataset' if finished else 'the old dataset, put back'})", file=sys.stderr)
        shutil.rmtree(aside, ignore_errors=True)
