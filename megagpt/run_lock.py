"""One owner per run dir (an advisory lock rank 0 holds for the job's lifetime) and the end of orphaned workers.

The lock is `flock` on RUN_DIR/.lock: the kernel releases it when its holder dies in any way (kill -9
included), so there are no stale locks to clean up. The file names the holder (host, pid, start time) so a
second job on the same run dir can say who owns it. A command that takes the lock and then refuses to run
gives it back with `release(undo=True)`, which leaves the run dir exactly as it found it.

The watchdog: a worker whose launcher (torchrun's agent, the deepspeed launcher) died must not train on and
write checkpoints beside a new job. On Linux the kernel kills it the moment the launcher dies
(PR_SET_PDEATHSIG); everywhere, a thread that sees it was reparented exits within a second, and a checkpoint
save checks first.
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from megagpt.distributed import DistInfo, on_main
from megagpt.errors import UserError

LOCK_NAME = ".lock"
WATCHDOG_INTERVAL = 1.0  # seconds between checks of the parent pid
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunDirBusy(UserError):
    """Another job owns the run dir."""


class RunLock:
    """Held from `acquire` until `release` (or the process's death)."""

    _held_fds: set[int] = set()  # closed in forked children: a DataLoader worker must not keep the lock alive

    def __init__(self, path: Path, fd: int, previous: bytes | None, created_dirs: list[Path]):
        self.path, self._fd = path, fd
        self._previous, self._created_dirs = previous, created_dirs  # what `release(undo=True)` restores

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Take the run dir's lock now, or raise RunDirBusy naming the holder."""
        run_dir = Path(run_dir)
        created_dirs = _make_dirs(run_dir)
        path = run_dir / LOCK_NAME
        while True:
            fd, created = _open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096)
                os.close(fd)
                raise RunDirBusy(f"{run_dir} is in use by {_describe(holder)}: wait for that job to end (or stop "
                                 f"it), or choose another --run-dir") from None
            if _same_file(fd, path):  # not unlinked by a holder that just gave it back: ours
                break
            os.close(fd)
        cls._held_fds.add(fd)
        lock = cls(path, fd, None if created else os.pread(fd, 1 << 20, 0), created_dirs)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as e:  # a full disk, say: leave the run dir as it was, and name the file
            lock.release(undo=True)
            raise OSError(e.errno, e.strerror, str(path)) from e
        return lock

    def release(self, undo: bool = False) -> None:
        """Give the lock back; with `undo` also put back what `acquire` changed (a command that refused)."""
        if self._fd is None:
            return
        if undo:
            if self._previous is None:
                self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees the inode is gone
            else:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._previous, 0)
            for directory in reversed(self._created_dirs):
                try:
                    directory.rmdir()
                except OSError:  # not empty after all
                    break
        RunLock._held_fds.discard(self._fd)
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None


def lock_run_dir(run_dir: str | Path, dist: DistInfo) -> RunLock | None:
    """Rank 0 takes the lock (the others get None); every rank raises RunDirBusy if it is taken."""
    taken: list[RunLock] = []

    def take() -> str | None:
        try:
            taken.append(RunLock.acquire(run_dir))
        except RunDirBusy as e:
            return str(e)
        return None

    problem = on_main(take)
    if problem is not None:
        raise RunDirBusy(problem)
    return taken[0] if taken else None


def _make_dirs(run_dir: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()][::-1]
    run_dir.mkdir(parents=True, exist_ok=True)
    return missing


def _open(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), False


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: bytes) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (starting up: it has not written its host and pid yet)"


def _close_held_in_child() -> None:
    for fd in RunLock._held_fds:  # the parent's descriptor keeps the lock; only LOCK_UN would drop it
        try:
            os.close(fd)
        except OSError:
            pass
    RunLock._held_fds.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


# ---------------------------------------------------------------------------------------------
# The watchdog on the launcher
# ---------------------------------------------------------------------------------------------
_launcher_pid: int | None = None


def start_parent_watchdog(interval: float = WATCHDOG_INTERVAL) -> bool:
    """Under a launcher (RANK set): exit within `interval` seconds of the launcher's death. True if started."""
    global _launcher_pid
    if "RANK" not in os.environ or _launcher_pid is not None:
        return False
    _launcher_pid = os.getppid()
    if _launcher_pid == 1:  # already orphaned (or started by init itself): nothing to watch
        _launcher_pid = None
        return False
    _die_with_parent()
    threading.Thread(target=_watch, args=(interval,), name="megagpt-launcher-watchdog", daemon=True).start()
    return True


def _die_with_parent() -> bool:
    """Linux: the kernel sends SIGKILL when the parent exits, so not one more step runs. (The parent is the
    thread that started us: torchrun's agent and the deepspeed launcher start workers from their main thread.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def launcher_died() -> bool:
    return _launcher_pid is not None and os.getppid() != _launcher_pid


def exit_if_orphaned() -> None:
    """Call before writing anything that outlives the process (a checkpoint)."""
    if launcher_died():
        _exit_orphaned()


def _watch(interval: float) -> None:
    event = threading.Event()
    while not event.wait(interval):
        exit_if_orphaned()


def _exit_orphaned() -> None:
    rank = os.environ.get("RANK", "?")
    print(f"megagpt: rank {rank}: the launcher (pid {_launcher_pid}) died; exiting without saving",
          file=sys.stderr, flush=True)
    os._exit(1)
