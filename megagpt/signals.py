"""Preemption: SIGTERM/SIGUSR1 on any rank asks every rank to save at the next step boundary and exit."""

from __future__ import annotations

import signal

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: nothing to install
                pass

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def requested_on_any_rank(self) -> bool:
        """All ranks agree, so all of them save the same step (a collective: call it on every rank)."""
        flag = self.signal_name is not None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor([int(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            if t.item() and self.signal_name is None:
                self.signal_name = "another rank's signal"
            flag = bool(t.item())
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
