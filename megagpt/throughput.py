"""Training throughput: tokens/s over the steps since the last report, with evaluation and checkpoint time left out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Throughput:
    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._restart()

    def _restart(self) -> None:
        self._start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def report(self) -> tuple[int, float]:
        """(steps, tokens/s) of the window since the last report; a new window starts."""
        steps, elapsed = self.steps, time.perf_counter() - self._start
        self._restart()
        return steps, steps * self.tokens_per_step / max(elapsed, 1e-9)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count (evaluation, sampling, checkpoints are not training throughput)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - started
