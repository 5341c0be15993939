"""Distributed facts in one place: rank, world size and device, the process group for any launcher or none,
and rank-0 output (every message once per job, not once per rank or DataLoader worker)."""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import socket
import sys
import warnings
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
    deepspeed = import_deepspeed()
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


def leave_process_group() -> None:
    """Destroy the process group before the interpreter exits. Left to interpreter shutdown, a rank that stops
    early (a refused config) sometimes ends in `terminate called without an active exception` (SIGABRT) from
    gloo's threads instead of its exit code."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def import_deepspeed():
    """DeepSpeed, imported the way megagpt runs it: told the accelerator where there is no GPU (rather than have
    it warn on stdout that it guessed), without its inference-only C++ build, and without notices a megagpt user
    cannot act on."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_inference_shm_op()
    import deepspeed
    from deepspeed.utils import logger

    _quiet_deepspeeds_deprecated_collectives()
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())
    return deepspeed


class _DropNotices(logging.Filter):
    """DeepSpeed's warnings that describe no problem in a megagpt run: megagpt has no tensor parallelism, so a
    universal checkpoint's load rightly sets the tensor-parallel size to 1."""

    NOTICES = ("MPU is not provided",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce (`deepspeed_shm_comm`) when it makes its
    process group, the first time on each machine and Python environment: 30-100 s on 2 cores. Only
    `inference_all_reduce` uses it, which training never calls; every collective of a run goes through
    torch.distributed (gloo) either way, so the build is skipped."""
    # by module name: the attribute `deepspeed.comm.torch` is the torch package that deepspeed.comm imports
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def _quiet_deepspeeds_deprecated_collectives() -> None:
    """DeepSpeed's ZeRO calls torch.distributed's all_gather_into_tensor and reduce_scatter_tensor, which torch
    2.13 deprecates with a FutureWarning on each rank's first call: nothing a user of megagpt can act on."""
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f"`torch.distributed.{name}` is deprecated", category=FutureWarning)


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def collective_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_distributed() -> bool:
    """More than one rank in the process group: collectives are needed."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0 of the job (or no group at all), and not a DataLoader worker."""
    if torch.utils.data.get_worker_info() is not None:
        return False
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def print_once(message: str) -> None:
    """A line on stderr from the main process only."""
    if is_main_process():
        print(f"megagpt: {message}", file=sys.stderr, flush=True)


def warn_once(message: str) -> None:
    """A warning line from the main process only (the others would repeat it once per rank and worker)."""
    print_once(f"warning: {message}")


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (a collective: every rank calls it); stays on the device."""
    if is_distributed():
        value = value.clone()
        torch.distributed.all_reduce(value)  # SUM: gloo has no AVG
        value = value / torch.distributed.get_world_size()
    return value


def barrier(slow: bool = False) -> None:
    """All ranks meet; `slow` for waits on rank-0-only work (hashing, converting) that outlast the timeout."""
    if is_distributed():
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
    if not is_distributed():
        return compute()
    box = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, group=slow_group())
    return box[0]
