"""`megagpt scaling fit|predict`: scaling laws with an irreducible loss, fitted to sweeps (numpy only), bootstrapped.

    megagpt scaling fit DIR... [--holdout KEY=VALUE] --out FIT_DIR
    megagpt scaling predict FIT_DIR/fit.json CONFIG [--set KEY=VALUE ...]

The points are the finished runs of `megagpt sweep` folders (results.json) or single run dirs: final val loss L,
non-embedding parameters N, training tokens D and FLOPs C = flops_per_token·D (PaLM accounting, GPT.flops_per_token).
Two laws (Kaplan et al. 2020; Hoffmann et al. 2022):
    compute frontier:  L(C) = E + A·C^−α            fitted to the points no cheaper point beats
    Chinchilla:        L(N, D) = E + A/N^α + B/D^β   fitted too when both N and D vary
Each fit is Levenberg-Marquardt on relative residuals log L̂ − log L (a few starts; E, A, B kept positive through
their logarithms; C, N, D divided by their geometric means), and its 95% intervals come from refitting
bootstrap resamples of the points. Held-out points (--holdout) are predicted, not fitted.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megagpt.errors import UserError
from megagpt.files import write_whole

BOOTSTRAP = 200
FORMULAS = {"compute": "L(C) = E + A * C^-alpha", "chinchilla": "L(N, D) = E + A / N^alpha + B / D^beta"}
PARAMS = {"compute": ("E", "A", "alpha"), "chinchilla": ("E", "A", "alpha", "B", "beta")}


# ---------------------------------------------------------------------------------------------
# The laws, in normalised units (x / its scale) with θ = (log E, log A, α[, log B, β])
# ---------------------------------------------------------------------------------------------
def law_value(law: str, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x: (n, 1) normalised C for "compute", (n, 2) normalised (N, D) for "chinchilla"."""
    if law == "compute":
        return np.exp(theta[0]) + np.exp(theta[1] - theta[2] * np.log(x[:, 0]))
    return (np.exp(theta[0]) + np.exp(theta[1] - theta[2] * np.log(x[:, 0]))
            + np.exp(theta[3] - theta[4] * np.log(x[:, 1])))


def to_physical(law: str, theta: np.ndarray, scale: np.ndarray) -> dict[str, float]:
    """θ in normalised units -> E, A, α (, B, β) of the law in the data's own units."""
    out = {"E": math.exp(theta[0]), "A": math.exp(theta[1] + theta[2] * math.log(scale[0])), "alpha": theta[2]}
    if law == "chinchilla":
        out.update(B=math.exp(theta[3] + theta[4] * math.log(scale[1])), beta=theta[4])
    return {k: float(v) for k, v in out.items()}


def from_physical(law: str, params: dict[str, float], scale: np.ndarray) -> np.ndarray:
    theta = [math.log(params["E"]), math.log(params["A"]) - params["alpha"] * math.log(scale[0]), params["alpha"]]
    if law == "chinchilla":
        theta += [math.log(params["B"]) - params["beta"] * math.log(scale[1]), params["beta"]]
    return np.array(theta)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------
def levenberg_marquardt(residual, theta: np.ndarray, max_iter: int = 500, tol: float = 1e-14) -> tuple:
    """Minimise ||residual(θ)||² from θ; a finite-difference Jacobian (a handful of parameters)."""
    damping, r = 1e-3, residual(theta)
    cost = float(r @ r)
    for _ in range(max_iter):
        J = _jacobian(residual, theta, r)
        JtJ, g = J.T @ J, J.T @ r
        step = np.linalg.solve(JtJ + damping * (np.diag(np.diag(JtJ)) + 1e-12 * np.eye(len(theta))), -g)
        candidate = theta + step
        r_new = residual(candidate)
        cost_new = float(r_new @ r_new) if np.all(np.isfinite(r_new)) else math.inf
        if cost_new < cost:
            converged = cost - cost_new <= tol * max(cost, 1e-30) or np.max(np.abs(step)) < 1e-12
            theta, r, cost, damping = candidate, r_new, cost_new, max(damping / 3, 1e-12)
            if converged:
                break
        else:
            damping *= 4
            if damping > 1e12:
                break
    return theta, cost


def _jacobian(residual, theta: np.ndarray, r: np.ndarray) -> np.ndarray:
    J = np.empty((len(r), len(theta)))
    for i in range(len(theta)):
        h = 1e-6 * max(1.0, abs(theta[i]))
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        J[:, i] = (residual(up) - residual(down)) / (2 * h)
    return J


def fit_law(law: str, x: np.ndarray, loss: np.ndarray, starts: list[np.ndarray] | None = None) -> tuple:
    """(θ, cost) of the best of several starts; x normalised."""
    def residual(theta):
        with np.errstate(over="ignore", invalid="ignore"):
            return np.log(law_value(law, theta, x)) - np.log(loss)

    best = (None, math.inf)
    for start in starts or initial_guesses(law, x, loss):
        theta, cost = levenberg_marquardt(residual, start)
        if cost < best[1]:
            best = (theta, cost)
    return best


def initial_guesses(law: str, x: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    """E a fraction of the smallest loss; the rest from a straight line through log(L − E) (compute), or a
    small grid of exponents sharing the reducible loss between the two terms (Chinchilla)."""
    starts = []
    for fraction in (0.05, 0.3, 0.6, 0.8, 0.9, 0.97):
        E = fraction * loss.min()
        if law == "compute":
            slope, intercept = np.polyfit(np.log(x[:, 0]), np.log(loss - E), 1)
            starts.append(np.array([math.log(E), intercept, -slope]))
        else:
            half = math.log(max(float(np.mean(loss)) - E, 1e-6) / 2)
            starts += [np.array([math.log(E), half, a, half, b]) for a in (0.2, 0.5) for b in (0.2, 0.5)]
    return starts


@dataclass
class Fit:
    law: str
    theta: np.ndarray
    scale: np.ndarray
    samples: np.ndarray  # bootstrap θs, (B, k)

    @property
    def params(self) -> dict[str, float]:
        return to_physical(self.law, self.theta, self.scale)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, 2.5th, 97.5th percentile) at raw x (n, 1|2)."""
        z = np.asarray(x, dtype=float) / self.scale
        spread = np.stack([law_value(self.law, t, z) for t in self.samples]) if len(self.samples) else None
        best = law_value(self.law, self.theta, z)
        if spread is None:
            return best, best, best
        return best, np.percentile(spread, 2.5, axis=0), np.percentile(spread, 97.5, axis=0)

    def intervals(self) -> dict[str, list[float]]:
        physical = [to_physical(self.law, t, self.scale) for t in self.samples]
        return {k: [float(np.percentile([p[k] for p in physical], q)) for q in (2.5, 97.5)] for k in self.params}


def fit_with_bootstrap(law: str, x: np.ndarray, loss: np.ndarray, samples: int = BOOTSTRAP,
                       seed: int = 0) -> Fit:
    """The fit on all points, then on `samples` resamples (with replacement) started from it."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    k, distinct = len(PARAMS[law]), len({tuple(row) for row in x})
    if distinct < k:
        raise UserError(f"{FORMULAS[law]} has {k} parameters: it needs points at {k} distinct "
                        f"{'FLOPs' if law == 'compute' else '(N, D)'}, got {distinct}")
    scale = np.exp(np.log(x).mean(axis=0))
    z = x / scale
    theta, _ = fit_law(law, z, loss)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(samples):
        pick = rng.integers(0, len(loss), len(loss))
        if len({tuple(row) for row in z[pick]}) < k:  # too few distinct points to pin k parameters
            continue
        t, cost = fit_law(law, z[pick], loss[pick], starts=[theta])
        if math.isfinite(cost):
            boot.append(t)
    if samples and not boot:
        raise UserError(f"{FORMULAS[law]}: none of the {samples} bootstrap resamples of the {len(loss)} points held "
                        f"{k} distinct ones to refit: pass a larger --bootstrap or add points")
    return Fit(law, theta, scale, np.array(boot).reshape(-1, k))


# ---------------------------------------------------------------------------------------------
# Points: rows of sweeps and run dirs
# ---------------------------------------------------------------------------------------------
def load_points(dirs: list[Path]) -> list[dict]:
    rows = []
    for directory in dirs:
        if (directory / "results.json").is_file():
            found = _read_rows(directory / "results.json")
        elif (directory / "metrics.jsonl").is_file() and (directory / "config.yaml").is_file():
            found = [_run_dir_row(directory)]
        else:
            raise UserError(f"{directory}: neither a sweep folder (results.json, from `megagpt sweep`) nor a run "
                            f"dir (config.yaml and metrics.jsonl, from `megagpt train`)")
        rows += [{**r, "source": str(directory)} for r in found]
    done = [r for r in rows if r.get("val_loss") is not None and r.get("flops") and math.isfinite(r["val_loss"])]
    if not done:
        raise UserError(f"{', '.join(map(str, dirs))}: no finished run with a final val loss")
    return done


def _read_rows(path: Path) -> list[dict]:
    """A sweep's results.json: a list of rows whose numbers are numbers (or null); else a one-line error."""
    todo = "the sweep's command (`megagpt sweep ... --out DIR`) run again rewrites it"
    try:
        rows = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); {todo}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: not a list of rows (JSON objects) as `megagpt sweep` writes; {todo}")
    for number, row in enumerate(rows, 1):
        bad = next((k for k in ("val_loss", "flops", "params", "tokens") if row.get(k) is not None
                    and (isinstance(row[k], bool) or not isinstance(row[k], int | float))), None)
        if bad is not None:
            raise UserError(f"{path}: row {number}: {bad} is {row[bad]!r}, expected a number or null; {todo}")
    return rows


def _run_dir_row(run_dir: Path) -> dict:
    from megagpt.config import load_config
    from megagpt.metrics import read_metrics
    from megagpt.sweep import model_size

    cfg = load_config(run_dir / "config.yaml")
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    last = train[-1]["step"] if train else 0
    val = next((r["val_loss"] for r in reversed(records) if r.get("step") == last and "val_loss" in r), None)
    params, per_token = model_size(run_dir, cfg)
    tokens = train[-1]["tokens_seen"] if train else 0
    return {"point": run_dir.name, "val_loss": val, "tokens": tokens, "params": params,
            "flops": per_token * tokens if per_token else None, "steps": last}


def split_holdout(rows: list[dict], holdout: list[str]) -> tuple[list[dict], list[dict]]:
    tests = []
    for item in holdout:
        key, sep, value = item.partition("=")
        if not sep or not any(key in r for r in rows):
            raise UserError(f"--holdout {item!r}: expected KEY=VALUE with KEY a swept key (or point) of the rows")
        tests.append((key, value))

    def held(row):
        return any(str(row.get(key)) == value or _same_number(row.get(key), value) for key, value in tests)

    kept, out = [r for r in rows if not held(r)], [r for r in rows if held(r)]
    if holdout and not out:
        raise UserError(f"--holdout {' '.join(holdout)}: matches no finished point")
    return kept, out


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def compute_frontier(rows: list[dict]) -> list[dict]:
    """The points no cheaper point beats: sorted by FLOPs, each lower in loss than all before it. Of runs of equal
    FLOPs (an LR swept at one size) only the lowest loss can be on it: the law has one value per C."""
    frontier, best = [], math.inf
    for row in sorted(rows, key=lambda r: (r["flops"], r["val_loss"])):
        if row["val_loss"] < best:
            frontier.append(row)
            best = row["val_loss"]
    return frontier


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
def fit_points(rows: list[dict], heldout: list[dict], samples: int = BOOTSTRAP) -> dict:
    """Both laws where the points allow them, each with its intervals and the held-out points' predictions."""
    result = {}
    frontier = compute_frontier(rows)
    _check_frontier(frontier, rows)
    laws = {"compute": (frontier, lambda r: [r["flops"]])}
    sizes = {(r["params"], r["tokens"]) for r in rows}
    if len({n for n, _ in sizes}) > 1 and len({d for _, d in sizes}) > 1 and len(sizes) >= len(PARAMS["chinchilla"]):
        laws["chinchilla"] = (rows, lambda r: [r["params"], r["tokens"]])
    for law, (points, features) in laws.items():
        fit = fit_with_bootstrap(law, [features(r) for r in points], [r["val_loss"] for r in points], samples)
        fitted = fit.predict(np.array([features(r) for r in points]))[0]
        result[law] = {
            "formula": FORMULAS[law], "params": fit.params, "ci95": fit.intervals(),
            "theta": fit.theta.tolist(), "scale": fit.scale.tolist(), "bootstrap_theta": fit.samples.tolist(),
            "points": [{**_brief(r), "fitted": float(f)} for r, f in zip(points, fitted, strict=True)],
            "max_rel_err_fitted": float(max(abs(f / r["val_loss"] - 1) for r, f in zip(points, fitted,
                                                                                        strict=True))),
            "heldout": [_heldout_row(fit, r, features) for r in heldout]}
        if fit.params["E"] < 1e-6 * min(r["val_loss"] for r in points):
            result[law]["note"] = ("E went to 0: the points do not pin the irreducible loss (they lie far above "
                                   "it), so this is a pure power law")
    return result


def _check_frontier(frontier: list[dict], rows: list[dict]) -> None:
    k = len(PARAMS["compute"])
    if len(frontier) < k:
        raise UserError(f"the compute frontier has {len(frontier)} point{'s' * (len(frontier) != 1)} (of {len(rows)} "
                        f"finished runs; runs of equal FLOPs count once) but {FORMULAS['compute']} needs at least "
                        f"{k} points: sweep at least {k} model sizes (e.g. --grid model.n_embd=32,64,128) or add "
                        f"runs of other sizes or step counts")


def _heldout_row(fit: Fit, row: dict, features) -> dict:
    best, lo, hi = (float(v[0]) for v in fit.predict(np.array([features(row)])))
    return {**_brief(row), "predicted": best, "ci95": [lo, hi], "measured": row["val_loss"],
            "rel_err": best / row["val_loss"] - 1}


def _brief(row: dict) -> dict:
    skip = {"status", "train_loss", "wall_s", "source"}
    return {k: v for k, v in row.items() if k not in skip}


def fit_from_json(entry: dict, law: str) -> Fit:
    """A law's fit as fit.json holds it; a ValueError where a length does not match the law."""
    k, features = len(PARAMS[law]), 1 if law == "compute" else 2
    theta, scale = np.array(entry["theta"], dtype=float), np.array(entry["scale"], dtype=float)
    if theta.shape != (k,) or scale.shape != (features,):
        raise ValueError(f"{law}: theta needs {k} numbers and scale {features}, got {theta.shape} and {scale.shape}")
    return Fit(law, theta, scale, np.array(entry["bootstrap_theta"], dtype=float).reshape(-1, k))


def fit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megagpt scaling fit", description="fit L(C) = E + A·C^-α (and Chinchilla's "
                                "L(N, D) when both vary) to sweep results, with bootstrap intervals")
    p.add_argument("dirs", nargs="+", type=Path, help="sweep folders (results.json) or run dirs")
    p.add_argument("--holdout", action="append", default=[], metavar="KEY=VALUE",
                   help="leave these points out of the fit and predict them, e.g. model.n_embd=512 (repeatable)")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help=f"resamples (default {BOOTSTRAP})")
    p.add_argument("--out", required=True, type=Path, help="folder for fit.json and fit.png")
    args = p.parse_args(argv)
    if args.bootstrap < 1:
        raise UserError(f"--bootstrap {args.bootstrap}: the 95% intervals need at least 1 resample (default "
                        f"{BOOTSTRAP})")
    rows, heldout = split_holdout(load_points(args.dirs), args.holdout)
    result = fit_points(rows, heldout, args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    write_whole(args.out / "fit.json", json.dumps(result, indent=1) + "\n")
    print(f"megagpt scaling fit: wrote {args.out / 'fit.json'}")
    plot = plot_fit(result, rows, heldout, args.out / "fit.png")
    if plot:
        print(f"megagpt scaling fit: wrote {plot}")
    for entry in result.values():
        ci = entry["ci95"]
        print(f"  {entry['formula']}: " + ", ".join(f"{k} {v:.4g} [{ci[k][0]:.4g}, {ci[k][1]:.4g}]"
                                                   for k, v in entry["params"].items()))
        if "note" in entry:
            print(f"    note: {entry['note']}")
        for h in entry["heldout"]:
            print(f"    held out {h['point']}: predicted {h['predicted']:.4f} [{h['ci95'][0]:.4f}, "
                  f"{h['ci95'][1]:.4f}], measured {h['measured']:.4f} ({100 * h['rel_err']:+.2f}%)")
    return 0


def plot_fit(result: dict, rows: list[dict], heldout: list[dict], path: Path) -> Path | None:
    """Loss against FLOPs: the points, the frontier fit with its 95% band, the held-out points."""
    try:
        import matplotlib
    except ImportError:
        print("megagpt scaling fit: matplotlib is not installed (pip install 'megagpt[plot]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = fit_from_json(result["compute"], "compute")
    everything = rows + heldout
    grid = np.geomspace(min(r["flops"] for r in everything) / 1.5, max(r["flops"] for r in everything) * 1.5, 200)
    best, lo, hi = fit.predict(grid[:, None])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.fill_between(grid, lo, hi, alpha=0.25, label="95% bootstrap band")
    params = result["compute"]["params"]
    ax.plot(grid, best, label=f"E + A·C^-α: E={params['E']:.3f}, α={params['alpha']:.3f}")
    ax.plot([r["flops"] for r in rows], [r["val_loss"] for r in rows], "o", label="fitted points")
    if heldout:
        ax.plot([r["flops"] for r in heldout], [r["val_loss"] for r in heldout], "r*", ms=12, label="held out")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="final val loss", title="scaling fit")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------
def config_point(cfg, world_size: int = 1) -> dict:
    """N (non-embedding parameters), D (tokens over train.max_steps) and C of a config, as the sweep counts them."""
    import torch

    from megagpt.ds_config import grad_accum_steps
    from megagpt.model import GPT

    if cfg.model.vocab_size is None:
        raise UserError("model.vocab_size is null in this config (it comes from the dataset): pass --set "
                        "model.vocab_size=N")
    with torch.device("meta"):
        model = GPT(cfg.model)
    accum = grad_accum_steps(cfg.train, cfg.model.block_size, world_size)
    tokens = cfg.train.max_steps * cfg.train.micro_batch_size * accum * world_size * cfg.model.block_size
    return {"params": model.num_params(), "tokens": tokens, "flops": float(model.flops_per_token()) * tokens}


def predict_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megagpt scaling predict", description="predict a config's final val loss "
                                "from a `megagpt scaling fit`")
    p.add_argument("fit", type=Path, help="fit.json (or its folder) written by `megagpt scaling fit`")
    p.add_argument("config", help="YAML config to predict")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world-size", type=int, default=1, help="ranks it would train on (tokens per step)")
    args = p.parse_args(argv)
    from megagpt.config import load_config

    path = args.fit / "fit.json" if args.fit.is_dir() else args.fit
    if not path.is_file():
        raise UserError(f"{args.fit}: no fit.json; make one with `megagpt scaling fit DIR... --out DIR`")
    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: must be at least 1")
    result = read_fit(path)
    point = config_point(load_config(args.config, args.overrides), args.world_size)
    print(f"megagpt scaling predict: {args.config}: N = {point['params']:,} parameters, D = {point['tokens']:,} "
          f"tokens, C = {point['flops']:.4g} FLOPs")
    for law, predicted in predict(result, point).items():
        print(f"  {FORMULAS[law]}: final val loss {predicted[0]:.4f} (95% CI {predicted[1]:.4f}-{predicted[2]:.4f})")
    return 0


def read_fit(path: Path) -> dict:
    """fit.json as `megagpt scaling fit` wrote it (each law's fit parses); else a one-line error naming it."""
    try:
        result = json.loads(path.read_text())
        for law, entry in result.items():
            fit_from_json(entry, law)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a fit's shape
        raise UserError(f"{path}: not a fit that `megagpt scaling fit` wrote ({type(e).__name__}: {e}); make it "
                        f"again with `megagpt scaling fit DIR... --out DIR`") from None
    return result


def predict(result: dict, point: dict) -> dict[str, tuple[float, float, float]]:
    out = {}
    for law, entry in result.items():
        features = [point["flops"]] if law == "compute" else [point["params"], point["tokens"]]
        out[law] = tuple(float(v[0]) for v in fit_from_json(entry, law).predict(np.array([features])))
    return out
