"""Files written whole: a reader (the next command, a resume after a kill, another rank) finds the old file or the
new one, never a part of either."""

from __future__ import annotations

import os
import re
from pathlib import Path

TEMP_SIBLING = re.compile(r"\..+\.tmp\d+")  # what temp_sibling names: a killed writer may leave one behind


def temp_sibling(path: str | Path) -> Path:
    """Where a whole write of `path` goes first: `.NAME.tmpPID` beside it, one per writing process, hidden."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_torn_writes(folder: str | Path) -> list[str]:
    """Removes the temporary siblings that killed writers left in `folder` (not below it; none if it does not
    exist yet); their names."""
    if not Path(folder).is_dir():
        return []
    torn = sorted(p.name for p in Path(folder).iterdir() if TEMP_SIBLING.fullmatch(p.name) and p.is_file())
    for name in torn:
        (Path(folder) / name).unlink(missing_ok=True)
    return torn


def write_whole(path: str | Path, data: bytes | str, fsync: bool = True) -> None:
    """`data` into its temporary sibling (`temp_sibling`), fsync'd, then renamed over `path`;
    the temporary file is removed if anything fails on the way. `fsync=False` for bulk files whose damage by a
    crash a checksum catches (a prep's chunks and shard indexes): the rename still makes them whole to readers."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
