"""Distributed facts read once (rank, local rank, world size) and the process group set-up, any launcher or none."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env() -> DistInfo:
    """torchrun and the deepspeed launcher set RANK/LOCAL_RANK/WORLD_SIZE; Slurm without them sets SLURM_*."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistInfo(0, 0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float) -> DistInfo:
    """Join (or, for a bare single process, create) the process group that DeepSpeed's engine needs."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn that it guessed
    import deepspeed

    info = read_dist_env()
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    if not torch.distributed.is_initialized():
        kwargs = {"rank": info.rank, "world_size": info.world_size}
        if not launched:
            # A bare single process: its own rendezvous on a free port, and nothing written to os.environ,
            # so a child process (a test, a launcher) never inherits a port this process is listening on.
            kwargs["init_method"] = f"tcp://127.0.0.1:{_free_port()}"
            kwargs["auto_mpi_discovery"] = False
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it; 0 is true for any child
        elif "MASTER_ADDR" not in os.environ:  # Slurm without torchrun: the first node of the allocation
            raise RuntimeError("MASTER_ADDR is not set: launch with launch/slurm.sbatch or torchrun")
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            verbose=False,
            **kwargs,
        )
    return info


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier(slow: bool = False) -> None:
    """All ranks meet; `slow` for waits on rank-0-only work (hashing, converting) that outlast the timeout."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier(group=slow_group() if slow else None)


_SLOW_GROUP = None
SLOW_TIMEOUT = datetime.timedelta(hours=6)


def slow_group():
    """A gloo group with a long timeout, made on first use (a collective: every rank must reach it).

    The main group's timeout is short on purpose (a dead rank must end the job within minutes), but ranks
    legitimately wait longer while rank 0 hashes a big checkpoint or converts one to universal format.
    """
    global _SLOW_GROUP
    if _SLOW_GROUP is None:
        _SLOW_GROUP = torch.distributed.new_group(backend="gloo", timeout=SLOW_TIMEOUT)
    return _SLOW_GROUP


def on_main(compute):
    """Rank 0 computes (e.g. hashes every checkpoint file), every rank gets the answer."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return compute()
    box = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, group=slow_group())
    return box[0]
