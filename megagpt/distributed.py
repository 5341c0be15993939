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
    import deepspeed

    info = read_dist_env()
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            verbose=False,
        )
    return info


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
