"""Stop signals: SIGTERM/SIGUSR1/SIGINT on any rank ask every rank to save at the next step boundary and exit.

A second Ctrl-C (SIGINT) ends the process at once, without saving and without a traceback. That is safe at any
moment, also in the middle of a save: a checkpoint's manifest is written last (atomically) by rank 0 after every
rank's files are complete, so an interrupted save is never taken for a checkpoint, and `latest` only moves after.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from megagpt.distributed import is_distributed, is_main_process, slow_group

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_NOW_CODE = 130  # what a shell reports for a process ended by SIGINT


class StopRequest:
    """Installs the handlers on construction (main thread only); `restore()` puts the previous ones back."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: nothing to install
                pass

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal_name == name:
            _exit_now(is_main_process())
        self.signal_name = name
        if signum == signal.SIGINT and is_main_process():  # every rank may see the Ctrl-C: one says so
            _say("Ctrl-C: saving a checkpoint at the end of this step, then exiting "
                 "(Ctrl-C again to quit at once without saving)")

    def requested_on_any_rank(self) -> bool:
        """All ranks agree, so all of them save the same step (a collective: call it on every rank)."""
        flag = self.signal_name is not None
        if is_distributed():  # on the CPU over gloo: agreeing needs no read back from a GPU
            t = torch.tensor([int(flag)])
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=slow_group())
            if t.item() and self.signal_name is None:
                self.signal_name = "another rank's signal"
            flag = bool(t.item())
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _say(message: str) -> None:
    # A progress bar may own the current line: start a fresh one.
    print(f"\nmegagpt: {message}", file=sys.stderr, flush=True)


def _exit_now(main: bool) -> None:
    """The second Ctrl-C: no unwinding (an exception here could be swallowed, or hang in a collective)."""
    if main:
        _say("Ctrl-C again: exiting now without saving; --resume auto continues from the newest complete "
             "checkpoint")
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(EXIT_NOW_CODE)
