"""`python -m megagpt.launcher ARGS`: torchrun (torch.distributed.run, the same arguments) as megagpt's launch
scripts start it, ending in one line when a signal stops the job or a worker fails.

torchrun forwards SIGTERM, SIGUSR1 and SIGINT to its workers, which save at the next step boundary and exit 0;
torchrun itself then raises SignalException, which Python prints as a traceback under the workers' last lines:
on every preemption the log would end in what looks like a crash. Here it ends in one line naming the signal,
with the shell's exit status for it (128 + the signal's number), so a requeue script can still tell a signal
from a finished job (0) or a failed one (torchrun's 1).

A worker that fails (a mistake it names in one line, such as a missing dataset, or a crash with its own traceback)
makes torchrun raise ChildFailedError, whose traceback and failure table would again bury the worker's own words:
here the job ends in one line naming the first rank that failed and how, and exits 1 as torchrun does.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name}: the workers were asked to save at their next step (their "
              f"lines above say what they saved); run the same command to resume", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode  # negative: the signal that killed it
        how = (f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals()
               else f"exited with code {code}")
        print(f"torchrun: rank {rank} (local rank {failure.local_rank}) {how} and the job stopped ({len(e.failures)} "
              f"of its workers failed); its lines above say why", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
