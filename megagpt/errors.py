"""The one base class for mistakes a user can fix (bad config, data, paths), which the CLI prints as one line,
the check of a path where a command must make a folder, and the range of a seed."""

from __future__ import annotations

from pathlib import Path

NAME_MAX = 255  # bytes in one file or folder name on Linux's file systems (ext4, xfs, NFS, Lustre)
SEED_MAX = 2**63 - 1  # so that a seed plus a rank or a run's index still fits torch's and numpy's generators


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


def check_seed(seed: int, named: str = "--seed") -> int:
    """The seed, or a one-line UserError naming it (as `named`) where it is outside 0 … SEED_MAX."""
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{named} {seed}: must be between 0 and 2**63 - 1")
    return seed
