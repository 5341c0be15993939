"""Rank-0 output in one place: console progress bar, metrics.jsonl and TensorBoard scalars/text."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


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

            # TensorBoard's own version of the same: readers drop earlier events at steps >= start_step.
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step)
        if progress_bar:
            self._bar = tqdm(
                total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

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


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only records up to `step` (all of them, evaluation included, belong to the checkpoint there)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _json_number(value: Any) -> Any:
    """NaN and inf are not JSON: a non-finite metric is written as null (TensorBoard still gets the value)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
