"""Checkpoints: DeepSpeed's sharded save/load plus per-rank RNG state, a verified manifest and an atomic `latest`."""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megagpt.dataset import sha256_file
from megagpt.distributed import DistInfo, barrier, warn_once
from megagpt.errors import UserError, refuse_file_in_the_way
from megagpt.files import remove_torn_writes, write_whole
from megagpt.run_lock import exit_if_orphaned

TAG_PATTERN = re.compile(r"^step_(\d{6,})$")
MANIFEST = "megagpt_manifest.json"
UNIVERSAL_SUFFIX = "_universal"  # step_NNNNNN_universal/: DeepSpeed's universal conversion of step_NNNNNN/
# A 16-bit ZeRO-0 checkpoint's client state: the names of DeepSpeed's fp32 master weights (its `fp32_groups` are
# unnamed lists), so that export, sample and init_from read them as zero_to_fp32 reads ZeRO 1-3's
MASTER_NAMES = "fp32_master_names"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    if not match:
        raise ValueError(f"not a megagpt checkpoint tag: {tag!r} (expected step_NNNNNN)")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# RNG state of one rank (dropout masks, sampling): saved by every rank, restored by the same rank.
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def derived_rng_state(seed: int, step: int, rank: int) -> None:
    """For a rank the checkpoint has no RNG file for (the world grew): seeded from (seed, step, rank)."""
    mixed = (seed * 1_000_003 + step) * 65_537 + rank
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The manifest: every file's size and sha256, written last, so a half-written tag is recognisable.
# ---------------------------------------------------------------------------------------------
def write_manifest(tag_dir: Path, extra: dict[str, Any]) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    write_whole(tag_dir / MANIFEST, json.dumps({"files": entries, **extra}, indent=1))


def verify_manifest(tag_dir: Path) -> str | None:
    """None when the tag is complete and intact, else what is wrong (naming the file)."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(name, int(want["bytes"]), str(want["sha256"])) for name, want in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a manifest's shape
        return f"{manifest} is unreadable ({type(e).__name__}: {e})"
    for name, size, sha256 in entries:
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size}"
        if sha256_file(path) != sha256:
            return f"{path} does not match its sha256 in {manifest}"
    return None


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class NoVerifiedCheckpoint(UserError):
    """The run dir has checkpoints, and none of them verifies: resuming would silently start over."""


class CheckpointSaveError(UserError):
    """Saving failed (disk full, quota, I/O): the partial tag is gone and the previous checkpoint stays newest."""


@dataclass(frozen=True)
class TagChoice:
    """Which tag to load, and what the user should hear about the choice (one line each)."""

    tag: str | None
    notes: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()  # "tag: problem" for sealed tags (or the one `latest` named) that fail

    def refusal(self, directory: Path) -> NoVerifiedCheckpoint | None:
        """With nothing to load but damaged checkpoints present: the error that says so."""
        if self.tag is not None or not self.damaged:
            return None
        return NoVerifiedCheckpoint(
            f"{directory}: no checkpoint verifies ({'; '.join(self.damaged)}), and --resume auto does not start "
            f"a run with checkpoints over from step 0: start a new run in a new --run-dir (or with "
            f"--resume never there), or delete those tags to start this one over")


# ---------------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------------
class Checkpointer:
    def __init__(self, directory: Path, dist: DistInfo, keep_last: int = 3, keep_every: int | None = None):
        self.directory, self.dist = Path(directory), dist
        self.keep_last, self.keep_every = keep_last, keep_every

    def refuse_obstacles(self) -> None:
        """A UserError where something the user made stands where checkpoints go: the folder as a file, or a
        `latest` that is not a file (a save would fail only at its first checkpoint, naming a temp file)."""
        refuse_file_in_the_way(self.directory, str(self.directory), "the run's checkpoints go there: move it away")
        latest = self.directory / "latest"
        if latest.exists() and not latest.is_file():
            raise UserError(f"{latest} is not a file (megagpt writes the newest tag's name there): move it away")

    def save(
        self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Path:
        """Every rank writes its shards; only after all have finished does rank 0 seal and point `latest` at it.

        A full disk (or any OSError: quota, I/O) removes the partial tag and raises CheckpointSaveError.
        """
        exit_if_orphaned()  # a worker whose launcher died writes nothing more
        tag = tag_for(step)
        tag_dir = self.directory / tag
        if self.dist.is_main:  # leftovers from a killed save of the same step
            shutil.rmtree(tag_dir, ignore_errors=True)
            shutil.rmtree(self.directory / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
            remove_torn_writes(self.directory)  # a killed write of `latest`
        barrier()
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
            torch.save(rng_state(), tag_dir / f"rng_rank{self.dist.rank:05d}.pt")
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            self._save_failed(tag_dir, e)
            raise
        barrier(slow=True)  # every rank's files are complete before rank 0 hashes them
        if self.dist.is_main:
            exit_if_orphaned()
            try:
                write_manifest(tag_dir, {"step": step, "world_size": self.dist.world_size, **(meta or {})})
                write_whole(self.directory / "latest", tag)
            except OSError as e:
                self._save_failed(tag_dir, e)
                raise
            self._prune(keep=tag)
        barrier(slow=True)
        return tag_dir

    def _save_failed(self, tag_dir: Path, error: Exception) -> None:
        """Remove the partial tag and raise one line saying what failed (on a full disk: what a checkpoint needs
        and what is free). Returns (the caller re-raises `error`) for a RuntimeError that is not a full disk.

        torch.save loses the errno (C++ streams): its RuntimeError counts as a full disk when the space left is
        below what the previous checkpoint took (1 MiB without one).
        """
        written = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()) if tag_dir.is_dir() else 0
        previous = self._newest_sealed(other_than=tag_dir.name)
        need = self._sealed_bytes(previous) if previous else 0
        if isinstance(error, OSError):
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        else:
            full = shutil.disk_usage(self.directory).free < max(need, 1 << 20)
            if not full:
                return
        shutil.rmtree(tag_dir, ignore_errors=True)
        if full:
            size = f"about {_human(need)} ({previous})" if previous else f"more than {_human(written)}"
            what = (f"no space left on device: a checkpoint takes {size}, "
                    f"{_human(shutil.disk_usage(self.directory).free)} free there")
            todo = "free some space (or lower train.keep_checkpoints), then run the same command to resume"
        else:
            what = f"{error.strerror or error} ({error.filename or tag_dir})"
            todo = "fix that, then run the same command to resume"
        resume_from = f" from {previous}" if previous else ""
        raise CheckpointSaveError(f"could not save checkpoint {tag_dir}: {what}; the partial checkpoint was "
                                  f"removed; {todo}{resume_from}") from None

    def _newest_sealed(self, other_than: str) -> str | None:
        sealed = [t for t in self.tags() if t != other_than and (self.directory / t / MANIFEST).is_file()]
        return sealed[-1] if sealed else None

    def _sealed_bytes(self, tag: str) -> int:
        try:
            return sum(f["bytes"] for f in self.read_manifest(tag)["files"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def tags(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        found = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
        return sorted(found, key=step_of)

    def latest_good_tag(self) -> str | None:
        """The newest tag that verifies (None if none does), saying why when `latest` names another."""
        return self.newest_verified().tag

    def newest_verified(self) -> TagChoice:
        """`choose_tag()`, with its notes said (call on rank 0 only, e.g. under `on_main`)."""
        choice = self.choose_tag()
        for note in choice.notes:
            warn_once(note)
        return choice

    def choose_tag(self) -> TagChoice:
        """`latest` is a hint: the newest tag that verifies wins. Nothing is said for tags newer than the one
        `latest` names that have no manifest: saves that were interrupted (expected after a kill)."""
        named, problem_with_latest = self._read_latest()
        notes, damaged, unfinished = [], [], []
        for tag in reversed(self.tags()):
            problem = verify_manifest(self.directory / tag)
            if problem is None:
                if tag != named:
                    notes.append(self._why_not_latest(tag, named, problem_with_latest))
                return TagChoice(tag, tuple(notes), tuple(damaged))
            if tag == named or (self.directory / tag / MANIFEST).is_file():
                notes.append(f"skipping checkpoint {tag}: {problem}")
                damaged.append(f"{tag}: {problem}")
            else:
                unfinished.append(tag)
        if unfinished:
            notes.append(f"ignoring {', '.join(unfinished)} in {self.directory}: a save that did not finish "
                         f"(no {MANIFEST})")
        if problem_with_latest and (self.directory / "latest").is_file():
            notes.append(problem_with_latest)
        return TagChoice(None, tuple(notes), tuple(damaged))

    def _read_latest(self) -> tuple[str | None, str | None]:
        """(the tag `latest` names, or None; what is wrong with `latest`, or None)."""
        path = self.directory / "latest"
        if not path.is_file():
            return None, f"{path} is missing"
        text = path.read_text(errors="replace").strip()
        if not text:
            return None, f"{path} is empty"
        if not TAG_PATTERN.match(text):
            return None, f"{path} holds {text[:40]!r}, not a checkpoint tag"
        if not (self.directory / text).is_dir():
            return text, f"{path} names {text}, which does not exist"
        return text, None

    def _why_not_latest(self, tag: str, named: str | None, problem_with_latest: str | None) -> str:
        if problem_with_latest is not None:
            return f"{problem_with_latest}; using {tag}, the newest checkpoint that verifies"
        if step_of(named) < step_of(tag):
            return (f"{self.directory / 'latest'} names {named}, but {tag} is newer and verifies (its save "
                    f"ended before `latest` moved); using {tag}")
        return f"using {tag}, the newest checkpoint that verifies, not {named} that {self.directory / 'latest'} names"

    def read_manifest(self, tag: str) -> dict[str, Any]:
        return json.loads((self.directory / tag / MANIFEST).read_text())

    def load(self, engine, tag: str, load_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
        """DeepSpeed state from `load_dir` (default the tag's dir, or its universal conversion), RNG from `tag`.

        The caller has verified the tag (`latest_good_tag`, or `verify_manifest` for an explicit one).
        """
        tag_dir = self.directory / tag
        load_dir = load_dir or tag_dir
        path, client_state = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir}")
        rng_file = tag_dir / f"rng_rank{self.dist.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            derived_rng_state(seed, step_of(tag), self.dist.rank)
        return client_state

    def _prune(self, keep: str) -> None:
        tags = self.tags()
        recent = set(tags[-self.keep_last :]) | {keep}
        for tag in tags:
            pinned = self.keep_every is not None and step_of(tag) % self.keep_every == 0
            if tag not in recent and not pinned:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
                shutil.rmtree(self.directory / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        for converted in self.directory.glob(f"step_*{UNIVERSAL_SUFFIX}"):  # of a tag of another run dir's
            if converted.name.removesuffix(UNIVERSAL_SUFFIX) not in tags:  # (--resume PATH): loaded, done with
                shutil.rmtree(converted, ignore_errors=True)
