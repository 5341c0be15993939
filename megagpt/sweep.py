"""`megagpt sweep`: a grid of config values, each point its own resumable run, then a results table and plots.

    megagpt sweep CONFIG --grid model.n_embd=64,128,256 --grid train.lr=1e-3,2e-3 [--set KEY=VALUE ...] --out DIR

Every point runs `python -m megagpt train CONFIG --set ... --run-dir DIR/<point>` in turn (or is handed to
`--launcher CMD`, e.g. "sbatch launch/slurm.sbatch", which gets CONFIG and the same arguments). Running the same
command again skips the finished points (a val loss at train.max_steps in metrics.jsonl), resumes an interrupted
one from its newest checkpoint and leaves failed ones alone unless --retry-failed. At the end DIR/results.csv
and DIR/results.json hold each point's keys, final val loss, tokens, parameters, FLOPs and wall time, and
DIR/val_loss_vs_<key>.png plots val loss against each swept key, one curve per value of the other keys.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from megagpt.config import Config, load_config, override_value
from megagpt.errors import NAME_MAX, UserError, refuse_file_in_the_way
from megagpt.files import write_whole

STATE = "sweep_point.json"  # in each point's run dir: wall time, attempts, last exit code, failed/submitted
SWEEP = "sweep.json"  # in DIR: the config, --set and grid the sweep was made with


@dataclass
class Point:
    keys: dict[str, str]  # swept key -> value as typed
    name: str
    cfg: Config

    def overrides(self, common: list[str]) -> list[str]:
        return [*common, *(f"{k}={v}" for k, v in self.keys.items())]


def sweep_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    grid = parse_grid(args.grid)
    out = Path(args.out)
    points = make_points(args.config, grid, args.overrides)  # every point's config validated before any run
    _remember(out, args.config, args.overrides, grid)
    code = run_points(points, args, out)
    results = collect(out, points)
    for path in write_results(results, out, list(grid)):
        print(f"megagpt sweep: wrote {path}")
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt sweep", description="train every point of a grid of config values "
                                "(resumable), then write results.csv/.json and plots")
    p.add_argument("config", help="YAML config every point starts from")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a swept key and its values, e.g. --grid train.lr=1e-3,2e-3 (repeatable: the product)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override shared by every point (repeatable)")
    p.add_argument("--out", required=True, help="the sweep's folder: one run dir per point, results, plots")
    p.add_argument("--launcher", help="submit each point with this command instead of running it here, e.g. "
                   "'sbatch launch/slurm.sbatch' (it gets CONFIG --set ... --run-dir DIR/<point>)")
    p.add_argument("--resubmit", action="store_true", help="with --launcher: submit unfinished points again")
    p.add_argument("--retry-failed", action="store_true", help="run points that failed before again")
    return p


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. train.lr=1e-3,2e-3")
        if key in grid:
            raise UserError(f"--grid {key}: given twice; list all its values in one --grid")
        twice = _listed_twice(vals)
        if twice:
            raise UserError(f"--grid {item!r}: {' and '.join(twice)} are one value, listed twice")
        grid[key] = vals
    return grid


def _listed_twice(values: list[str]) -> list[str] | None:
    """Two of the values that the config reads as one (0.001 and 1e-3), else None; text that is not YAML (the
    point's config names it later) stands for itself."""
    seen: dict[str, str] = {}
    for text in values:
        try:
            key = repr(override_value(text))
        except yaml.YAMLError:
            key = text
        if key in seen:
            return [seen[key], text]
        seen[key] = text
    return None


def make_points(config: str, grid: dict[str, list[str]], common: list[str]) -> list[Point]:
    both = next((item for item in common if item.partition("=")[0].strip() in grid), None)
    if both is not None:  # the grid's value is applied last: the --set would be silently lost
        raise UserError(f"--set {both} and --grid {both.partition('=')[0].strip()}: the grid sets this key at every "
                        f"point; drop the --set, or the key from the grid")
    leaves = [key.rsplit(".", 1)[-1] for key in grid]
    short = len(set(leaves)) == len(leaves)  # "lr=0.001" unless two swept keys share a leaf name
    points = []
    for values in itertools.product(*grid.values()):
        keys = dict(zip(grid, values, strict=True))
        name = "__".join(f"{k.rsplit('.', 1)[-1] if short else k}={v}" for k, v in keys.items())
        points.append(Point(keys, _dir_name(name.replace("/", "_")), _point_config(config, common, keys, grid)))
    return points


def _dir_name(name: str) -> str:
    """A point's name as a directory name: one longer than a file system takes (255 bytes) is cut and made
    unique (and the same at every run of the sweep) by a hash of the whole."""
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    return raw[:NAME_MAX - 17].decode(errors="ignore") + "-" + hashlib.sha256(raw).hexdigest()[:16]


def _point_config(config: str, common: list[str], keys: dict[str, str], grid: dict[str, list[str]]) -> Config:
    """The point's config; a bad swept key or value is named as the `--grid KEY=V1,V2,...` the user typed."""
    swept = {f"{k}={v}": f"--grid {k}={','.join(grid[k])}" for k, v in keys.items()}
    return load_config(config, [*common, *swept], named=swept)


def _remember(out: Path, config: str, common: list[str], grid: dict[str, list[str]]) -> None:
    """DIR/sweep.json: a later command on the same DIR must sweep the same config with the same --set."""
    path = out / SWEEP
    now = {"config": str(Path(config).resolve()), "set": common, "grid": grid}
    refuse_file_in_the_way(out, f"--out {out}", "the sweep needs a folder")
    if path.is_file():
        before = read_json(path, {"config": str, "set": list, "grid": dict}, "delete it to start the sweep's "
                           "record over (the points' run dirs are kept)")
        if (before["config"], before["set"]) != (now["config"], now["set"]):
            raise UserError(f"--out {out}: holds a sweep of {before['config']} with --set {before['set']}; "
                            f"pass the same config and --set to continue it, or another --out")
        now["grid"] = {**before["grid"], **grid}
    out.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(now, indent=1) + "\n")


def read_json(path: Path, fields: dict[str, type], todo: str) -> dict:
    """A JSON object megagpt wrote, with these fields of these types; else a one-line UserError naming the file,
    what is wrong and `todo` (a torn write, a hand edit)."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({e}); {todo}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: a JSON {type(value).__name__}, expected an object; {todo}")
    bad = next((k for k, kind in fields.items() if not isinstance(value.get(k), kind)), None)
    if bad is not None:
        raise UserError(f"{path}: {bad!r} is {value.get(bad)!r}, expected a {fields[bad].__name__}; {todo}")
    return value


# ---------------------------------------------------------------------------------------------
# Running the points
# ---------------------------------------------------------------------------------------------
def run_points(points: list[Point], args, out: Path) -> int:
    """Each point in turn; 130 after a Ctrl-C (the running point saved: the same command resumes it)."""
    from tqdm import tqdm

    # Ctrl-C must reach this loop even when the sweep was started with SIGINT ignored (a background job of a
    # shell inherits that): the running point saves, and the sweep says how to resume.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bar = tqdm(points, desc="sweep", unit="point")
    for point in bar:
        bar.set_postfix_str(point.name)
        try:
            status = run_point(point, args, out / point.name)
        except KeyboardInterrupt:
            bar.close()
            print(f"megagpt sweep: interrupted in point {point.name}; run the same command to resume it",
                  file=sys.stderr)
            return 130
        bar.write(f"{point.name}: {status}")
        if status.startswith("stopped"):
            bar.close()
            return 1
    return 0


def run_point(point: Point, args, run_dir: Path) -> str:
    if is_finished(run_dir, point.cfg):
        return "done (skipped)"
    state = read_state(run_dir)
    if state.get("failed") and not args.retry_failed:
        return f"failed before (exit {state['exit']}; log {run_dir / 'sweep.log'}): --retry-failed runs it again"
    if state.get("submitted") and args.launcher and not args.resubmit:
        return "submitted earlier, not finished yet (--resubmit submits it again)"
    resuming = (run_dir / "checkpoints").is_dir()
    code, seconds = _run(_command(point, args, run_dir), run_dir)
    state.update(wall_s=state.get("wall_s", 0.0) + seconds, attempts=state.get("attempts", 0) + 1, exit=code,
                 failed=code != 0, submitted=bool(args.launcher) and code == 0)
    write_state(run_dir, state)
    if code != 0:
        return f"failed (exit {code}; log {run_dir / 'sweep.log'})"
    if is_finished(run_dir, point.cfg):
        return f"done in {seconds:.0f} s" + (" (resumed)" if resuming else "")
    if args.launcher:
        return "submitted"
    return f"stopped before train.max_steps (log {run_dir / 'sweep.log'}); the same command resumes it"


def _command(point: Point, args, run_dir: Path) -> list[str]:
    sets = [arg for item in point.overrides(args.overrides) for arg in ("--set", item)]
    if args.launcher:
        return [*shlex.split(args.launcher), args.config, *sets, "--run-dir", str(run_dir)]
    return [sys.executable, "-m", "megagpt", "train", args.config, *sets, "--run-dir", str(run_dir),
            "--resume", "auto"]


def _run(cmd: list[str], run_dir: Path) -> tuple[int, float]:
    """The command with its output appended to run_dir/sweep.log; a Ctrl-C reaches it too (same process
    group): wait for it to save, then pass the interrupt on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "sweep.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # it got the Ctrl-C as well and is saving; a second Ctrl-C ends both at once
            state = read_state(run_dir)
            write_state(run_dir, {**state, "exit": proc.returncode,
                                  "wall_s": state.get("wall_s", 0.0) + time.perf_counter() - started})
            raise
    return code, time.perf_counter() - started


def read_state(run_dir: Path) -> dict:
    path = run_dir / STATE
    if not path.is_file():
        return {}
    return read_json(path, {}, "delete it: the point then counts as never run before (its checkpoints stay)")


def write_state(run_dir: Path, state: dict) -> None:
    write_whole(run_dir / STATE, json.dumps(state, indent=1) + "\n")


def is_finished(run_dir: Path, cfg: Config) -> bool:
    """Finished: metrics.jsonl holds the val loss of train.max_steps (the trainer evaluates its last step)."""
    return final_val_loss(run_dir, cfg.train.max_steps) is not None


def final_val_loss(run_dir: Path, max_steps: int) -> float | None:
    from megagpt.metrics import read_metrics  # torch: only where a point's records are read

    return next((r["val_loss"] for r in reversed(read_metrics(run_dir))
                 if r.get("step") == max_steps and "val_loss" in r), None)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def collect(out: Path, points: list[Point]) -> list[dict]:
    """One row per point: its keys, status, final val and train loss, tokens, parameters, FLOPs, wall time."""
    from megagpt.metrics import read_metrics

    rows = []
    for point in points:
        run_dir = out / point.name
        records = [r for r in read_metrics(run_dir) if "loss" in r]
        val = final_val_loss(run_dir, point.cfg.train.max_steps)
        tokens = records[-1]["tokens_seen"] if records else 0
        params, per_token = model_size(run_dir, point.cfg)
        rows.append({**point.keys, "point": point.name, "status": "done" if val is not None else "unfinished",
                     "val_loss": val, "train_loss": records[-1]["loss"] if records else None,
                     "steps": records[-1]["step"] if records else 0, "tokens": tokens, "params": params,
                     "flops": per_token * tokens if per_token else None,
                     "wall_s": read_state(run_dir).get("wall_s")})
    return rows


def model_size(run_dir: Path, cfg: Config) -> tuple[int | None, float | None]:
    """(non-embedding parameters, training FLOPs per token) of the run's resolved model, counted on meta."""
    import torch

    from megagpt.model import GPT

    if (run_dir / "config.yaml").is_file():
        try:
            cfg = load_config(run_dir / "config.yaml")  # vocab_size resolved from the dataset
        except UserError:  # written by another megagpt version: the point's own config still counts the model
            pass
    if cfg.model.vocab_size is None:
        return None, None
    with torch.device("meta"):
        model = GPT(cfg.model)
    return model.num_params(), float(model.flops_per_token())


def write_results(rows: list[dict], out: Path, keys: list[str]) -> list[Path]:
    write_whole(out / "results.json", json.dumps(rows, indent=1) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_whole(out / "results.csv", table.getvalue())
    return [out / "results.csv", out / "results.json", *plot_results(rows, out, keys)]


def plot_results(rows: list[dict], out: Path, keys: list[str]) -> list[Path]:
    """val loss against each swept key with more than one value, one curve per value of the other keys; with two
    or more other keys, one panel per value of the last of them (e.g. loss vs LR, a curve per width, a panel per
    parametrization)."""
    try:
        import matplotlib
    except ImportError:
        print("megagpt sweep: matplotlib is not installed (pip install 'megagpt[plot]'): no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    written = []
    for key in [k for k in keys if len({r[k] for r in rows}) > 1]:
        others = [k for k in keys if k != key]
        panel_key = others.pop() if len(others) >= 2 else None
        panels = sorted({r[panel_key] for r in rows}, key=_sortable) if panel_key else [None]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            _plot_curves(ax, [r for r in done if panel_key is None or r[panel_key] == panel], key, others)
            title = f"{out.name}: val loss vs {key}" + (f", {panel_key}={panel}" if panel_key else "")
            ax.set(xlabel=key, ylabel="final val loss", title=title)
            xs = [_sortable(r[key]) for r in rows]
            if all(isinstance(x, float) and x > 0 for x in xs) and max(xs) / min(xs) >= 8:
                ax.set_xscale("log", base=2)
        fig.tight_layout()
        path = out / f"val_loss_vs_{key.rsplit('.', 1)[-1]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plot_curves(ax, rows: list[dict], key: str, others: list[str]) -> None:
    """One curve per combination of the `others` keys' values, its best point ringed."""
    for label, curve in itertools.groupby(sorted(rows, key=lambda r: [_sortable(r[k]) for k in others]),
                                          key=lambda r: tuple(r[k] for k in others)):
        curve = sorted(curve, key=lambda r: _sortable(r[key]))
        xs, ys = [_sortable(r[key]) for r in curve], [r["val_loss"] for r in curve]
        line, = ax.plot(xs, ys, "o-", label=", ".join(f"{k}={v}" for k, v in zip(others, label, strict=True)))
        best = ys.index(min(ys))
        ax.plot([xs[best]], [ys[best]], "o", ms=12, mfc="none", color=line.get_color())
    if others:
        ax.legend(fontsize=7)


def _sortable(value: str):
    try:
        return float(value)
    except ValueError:
        return value
