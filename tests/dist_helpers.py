"""Helpers for the multi-process tests: the real launch/*.sh scripts on loopback with gloo, tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import CPU_CONFIG, REPO, losses, metrics, tiny_overrides  # noqa: F401 (re-exported)

BASE_CONFIG = CPU_CONFIG
# Multi-process runs: no evaluation or samples in the way, a fixed LR horizon, a higher LR so a few steps move.
QUIET = {"micro_batch_size": 4, "max_steps": 8, "eval_interval": 10_000, "eval_steps": 2, "log_interval": 1,
         "checkpoint_interval": 10_000, "sample_tokens": 0, "warmup_steps": 2, "lr_decay_steps": 400, "lr": 3e-3,
         "threads": 1}


def tiny(dataset_dir: Path, **train) -> list[str]:
    """helpers.tiny_overrides with the QUIET defaults and no TensorBoard."""
    return tiny_overrides(dataset_dir, tensorboard=False, **{**QUIET, **train})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # this process's own group
        env.pop(key, None)
    env.update(extra)
    return env


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def torchrun(run_dir: Path, overrides: list[str], nproc: int = 2, *extra: str, port: int | None = None,
             nnodes: int = 1, node_rank: int = 0, log: Path | None = None) -> subprocess.Popen:
    """launch/torchrun.sh CONFIG --set ... --run-dir RUN_DIR, started (not waited for)."""
    env = child_env(NPROC_PER_NODE=str(nproc), NNODES=str(nnodes), NODE_RANK=str(node_rank),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()), SHUTDOWN_TIMEOUT="60")
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), str(BASE_CONFIG), *set_args(overrides),
           "--run-dir", str(run_dir), *extra]
    return _start(cmd, env, log or Path(str(run_dir) + f".node{node_rank}.log"))


def deepspeed_launcher(run_dir: Path, overrides: list[str], hostfile: Path, node_rank: int, port: int,
                       *extra: str) -> subprocess.Popen:
    env = child_env(HOSTFILE=str(hostfile), NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    cmd = ["bash", str(REPO / "launch" / "deepspeed.sh"), str(BASE_CONFIG), *set_args(overrides),
           "--run-dir", str(run_dir), *extra]
    return _start(cmd, env, Path(str(run_dir) + f".ds{node_rank}.log"))


def single(run_dir: Path, overrides: list[str], *extra: str) -> subprocess.Popen:
    """A bare `python -m megagpt train` (one process, no launcher)."""
    cmd = [sys.executable, "-m", "megagpt", "train", str(BASE_CONFIG), *set_args(overrides),
           "--run-dir", str(run_dir), *extra]
    return _start(cmd, child_env(), Path(str(run_dir) + ".single.log"))


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Its own session, so a test can kill the launcher with all its workers; output to `log`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log_path = log
    return proc


def finish(*procs: subprocess.Popen, timeout: float = 240, ok: bool = True) -> list[int]:
    """Wait for every process; on timeout kill them all. With `ok`, fail with the logs unless all exit 0."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if ok and any(codes):
        raise AssertionError(f"exit codes {codes}:\n" + "\n".join(_log_tail(p) for p in procs))
    return codes


def _log_tail(proc: subprocess.Popen, chars: int = 6000) -> str:
    return f"--- {proc.log_path} ---\n{proc.log_path.read_text()[-chars:]}"


def run(proc_factory, *args, **kwargs) -> None:
    """Start one launcher process and require exit 0."""
    finish(proc_factory(*args, **kwargs))


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The training processes under a launcher: its descendants that run `megagpt train`."""
    import psutil

    procs = psutil.Process(launcher.pid).children(recursive=True)
    launchers = ("megagpt.launcher", "torch.distributed.run", "deepspeed.launcher")
    return [p.pid for p in procs if " megagpt train " in f" {' '.join(p.cmdline())} "
            and not any(name in " ".join(p.cmdline()) for name in launchers)]


def client_state(run_dir: Path, tag: str) -> dict:
    """What megagpt stored beside DeepSpeed's state in a tag (step, loader position, ...)."""
    path = Path(run_dir) / "checkpoints" / tag
    states = sorted(path.glob("*model_states.pt"))
    return torch.load(states[0], map_location="cpu", weights_only=False)
