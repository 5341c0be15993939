"""Files written whole: a reader (the next command, a resume after a kill, another rank) finds the old file or the
new one, never a part of either."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: str | Path, data: bytes | str, fsync: bool = True) -> None:
    """`data` into a temporary sibling (`.NAME.tmpPID`: one per writing process), fsync'd, then renamed over `path`;
    the temporary file is removed if anything fails on the way. `fsync=False` for bulk files whose damage by a
    crash a checksum catches (a prep's chunks and shard indexes): the rename still makes them whole to readers."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
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
