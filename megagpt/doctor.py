"""`megagpt doctor [--full] [--out DIR] [--time-limit S]`: check a new machine or cluster, one line per check.

The checks (megagpt/doctor_checks.py): versions and missing packages, devices and their known peaks, native bf16,
a collective across local devices, each Triton kernel against its reference, 20 steps of a tiny training.
`--full` (a GPU, megagpt/doctor_full.py) adds the GPU tests, the kernels' cold first step, the bf16 matrix rate,
kernel benchmarks, a gpt3_125m step-time/MFU probe and the whole shakespeare_char run, within 8 minutes, and
judges issue #14's goals on them. Exit 0 only if every check that applies passed. Imports only the standard
library at the top, so it also runs where megagpt's own dependencies are missing, and says which.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megagpt import doctor_full
from megagpt.doctor_checks import CHECKS, Result, run_checks
from megagpt.errors import UserError


def main(argv: list[str] | None = None, checks: list[Callable] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt doctor", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--full", action="store_true", help="GPU only: tests, benchmarks, training probes (8 min)")
    p.add_argument("--out", type=Path,
                   help="--full's report and logs [doctor_out]: a new or empty folder, or an earlier doctor's (its "
                        "parts' folders are replaced)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="end --full within this many seconds of doctor's start (a lease's or a job's limit): "
                        "its budget shrinks by what the checks before it took")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.time_limit is not None and not 0 < args.time_limit < math.inf:
        raise UserError(f"--time-limit {args.time_limit}: must be a number of seconds above 0")
    if not args.full and (args.out is not None or args.time_limit is not None):
        raise UserError("--out and --time-limit are --full's: without --full doctor writes nothing and has no "
                        "time limit")
    if args.full:
        args.out = args.out or Path("doctor_out")
        doctor_full.check_out(args.out)  # before the checks: --full's parts write there
    started = time.perf_counter()
    print(f"{'check':<18} {'':<4} {'time':>8}  detail", flush=True)
    results = run_checks(CHECKS if checks is None else checks)
    full: list[Result] = []
    if args.full:
        left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - started)
        full = doctor_full.run(args.out, results, left)
    failed = [r for r in results + full if r.status == "FAIL"]
    skipped = [r.name for r in results + full if r.status == "SKIP"]
    summary = f"{len(results + full) - len(failed) - len(skipped)} passed, {len(failed)} failed"
    print(summary + (f", skipped: {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
