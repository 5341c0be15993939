"""The one base class for mistakes a user can fix (bad config, data, paths), which the CLI prints as one line,
and the check of a path where a command must make a folder."""

from __future__ import annotations

from pathlib import Path

NAME_MAX = 255  # bytes in one file or folder name on Linux's file systems (ext4, xfs, NFS, Lustre)


class UserError(ValueError):
    """Raised with a message that names the file, key or value and what to do."""


def refuse_file_in_the_way(folder: Path, named: str, hint: str) -> None:
    """A UserError where a file stands at `folder` or above it, so that no folder can be made there; `named`: how
    the user gave the path (`--out DIR`), `hint`: what to do."""
    file = file_in_the_way(folder)
    if file is not None:
        where = "is a file" if file == folder else f"is inside {file}, which is a file"
        raise UserError(f"{named}: {where}; {hint}")


def file_in_the_way(folder: Path) -> Path | None:
    """The file at `folder` or at one of its parents (None: a folder can be made there, as far as files go)."""
    return next((path for path in [folder, *folder.parents] if path.exists() and not path.is_dir()), None)
