"""Rank-0 output in one place: console progress bar, metrics.jsonl and TensorBoard scalars/text."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megagpt.distributed import warn_once
from megagpt.errors import UserError

LINE_PROGRESS_EVERY_S = 30.0  # where stderr is not a terminal: a progress line at most this often


class RunLogger:
    """Every rank constructs one; only the main rank writes anything."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        start_step: int,
        max_steps: int,
        tensorboard: bool = True,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        _drop_records_after(metrics, start_step)  # what a killed run logged past its last checkpoint
        self._jsonl = open(metrics, "a", buffering=1)  # a resumed run appends
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard's own version of the same: readers drop earlier events at steps >= purge_step, and the
            # checkpoint's own step (its loss, its evaluation) stays, as in metrics.jsonl.
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        if progress_bar and sys.stderr.isatty():
            self._bar = tqdm(
                total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        elif progress_bar:  # a log file or a batch job's output: lines, not a bar redrawn with carriage returns
            self._bar = LineProgress(max_steps, start_step, LINE_PROGRESS_EVERY_S)

    def info(self, message: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar else print)(message)

    def log(self, step: int, values: dict[str, Any], section: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    tag = "val/loss" if key == "val_loss" else f"{section}/{key}"
                    self._tb.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text.replace("\n", "  \n"), step)  # markdown line breaks

    def progress(self, steps: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


class LineProgress:
    """The progress bar where stderr is not a terminal: `train: step N/M (P%): key value, ...` at most every
    `every` seconds and at the last step, with tqdm's interface as RunLogger uses it."""

    def __init__(self, total: int, initial: int, every: float):
        self.total, self.n, self.every, self._shown = total, initial, every, time.monotonic()

    def update(self, steps: int) -> None:
        self.n += steps

    def set_postfix(self, postfix: dict[str, Any], refresh: bool = False) -> None:
        if time.monotonic() - self._shown >= self.every or self.n >= self.total:
            self._shown = time.monotonic()
            shown = ", ".join(f"{key} {value}" for key, value in postfix.items())
            print(f"train: step {self.n}/{self.total} ({self.n / self.total:.0%}): {shown}", file=sys.stderr,
                  flush=True)

    def write(self, message: str) -> None:
        print(message, flush=True)

    def close(self) -> None:
        pass


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only records up to `step` (all of them, evaluation included, belong to the checkpoint there).

    A crash in the middle of a write leaves a torn last line: it is dropped with a warning. Any other line
    that is not a record is an error naming the line. The file is only rewritten when something goes.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a rewrite that was killed
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept, dropped = [], bool(text) and not text.endswith("\n")  # an append would continue that line
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record_step = _step_of(line)
        if record_step is None:
            if number < len(lines):
                raise UserError(_not_a_record(path, number, line))
            warn_once(f"{path}: dropping a torn last line (a crash in the middle of a write)")
            dropped = True
        elif record_step <= step:
            kept.append(line)
        else:
            dropped = True
    if dropped:
        _replace(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _replace(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it over `path`; no temporary file survives a failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_number(value: Any) -> Any:
    """NaN and inf are not JSON: a non-finite metric is written as null (TensorBoard still gets the value)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl in order ([] before it exists), what sweeps, scaling fits, tests and
    benchmarks read instead of live state. A torn last line (a run killed in the middle of a write, which its
    resume drops too) is left out; any other line that is not JSON is a one-line error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(_not_a_record(path, number, line)) from None
    return records


def _not_a_record(path: Path, number: int, line: str) -> str:
    return f"{path}, line {number}: not a metrics record ({line[:60]!r}); delete that line"
