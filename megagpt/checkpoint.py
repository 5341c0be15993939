"""Checkpoints: DeepSpeed's sharded save/load plus per-rank RNG state, a verified manifest and an atomic `latest`."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megagpt.distributed import DistInfo, barrier

TAG_PATTERN = re.compile(r"^step_(\d{6,})$")
MANIFEST = "megagpt_manifest.json"
UNIVERSAL_SUFFIX = "_universal"  # step_NNNNNN_universal/: DeepSpeed's universal conversion of step_NNNNNN/


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
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(tag_dir: Path, extra: dict[str, Any]) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _atomic_write(tag_dir / MANIFEST, json.dumps({"files": entries, **extra}, indent=1))


def verify_manifest(tag_dir: Path) -> str | None:
    """None when the tag is complete and intact, else what is wrong (naming the file)."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{path} does not match its sha256 in {manifest}"
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------------
class Checkpointer:
    def __init__(self, directory: Path, dist: DistInfo, keep_last: int = 3, keep_every: int | None = None):
        self.directory, self.dist = Path(directory), dist
        self.keep_last, self.keep_every = keep_last, keep_every

    def save(
        self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> Path:
        """Every rank writes its shards; only after all have finished does rank 0 seal and point `latest` at it."""
        tag = tag_for(step)
        tag_dir = self.directory / tag
        if self.dist.is_main:  # leftovers from a killed save of the same step
            shutil.rmtree(tag_dir, ignore_errors=True)
            shutil.rmtree(self.directory / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{self.dist.rank:05d}.pt")
        barrier(slow=True)  # every rank's files are complete before rank 0 hashes them
        if self.dist.is_main:
            write_manifest(tag_dir, {"step": step, "world_size": self.dist.world_size, **(meta or {})})
            _atomic_write(self.directory / "latest", tag)
            self._prune(keep=tag)
        barrier(slow=True)
        return tag_dir

    def tags(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        found = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
        return sorted(found, key=step_of)

    def latest_good_tag(self) -> str | None:
        """The tag `latest` names if it verifies; otherwise the newest older tag that does, with a warning."""
        latest_file = self.directory / "latest"
        named = latest_file.read_text().strip() if latest_file.is_file() else None
        candidates = [t for t in reversed(self.tags()) if named is None or step_of(t) <= step_of(named)]
        for tag in candidates:
            problem = verify_manifest(self.directory / tag)
            if problem is None:
                return tag
            warnings.warn(f"skipping checkpoint {tag}: {problem}", stacklevel=2)
        return None

    def read_manifest(self, tag: str) -> dict[str, Any]:
        return json.loads((self.directory / tag / MANIFEST).read_text())

    def load(self, engine, tag: str, load_tag: str | None = None, seed: int = 0) -> dict[str, Any]:
        """DeepSpeed state from `load_tag` (default `tag`, or its universal conversion), RNG from `tag`.

        The caller has verified the tag (`latest_good_tag`, or `verify_manifest` for an explicit one).
        """
        tag_dir = self.directory / tag
        path, client_state = engine.load_checkpoint(str(self.directory), tag=load_tag or tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {self.directory / (load_tag or tag)}")
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
