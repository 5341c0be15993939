"""Scaling-law fits: known laws recovered from synthetic points, held-out and config predictions, the CLI."""

import json

import numpy as np
import pytest
from helpers import CPU_CONFIG

from megagpt.cli import main
from megagpt.config import load_config
from megagpt.errors import UserError
from megagpt.model import GPT
from megagpt.scaling import compute_frontier, config_point, fit_with_bootstrap, predict, split_holdout

E, ALPHA = 1.7, 0.3
A = 1.5 * 1e13**ALPHA  # the reducible loss is 1.5 at 1e13 FLOPs


def compute_law(flops):
    return E + A * np.asarray(flops, dtype=float) ** -ALPHA


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_fit_recovers_the_exponent_and_irreducible_loss_within_5_percent(seed):
    rng = np.random.default_rng(seed)
    flops = np.geomspace(1e13, 1e17, 8) * np.exp(rng.uniform(-0.2, 0.2, 8))
    loss = compute_law(flops) * (1 + 0.003 * rng.standard_normal(8))  # 0.3% noise
    fit = fit_with_bootstrap("compute", flops[:, None], loss, samples=50, seed=seed)
    assert fit.params["alpha"] == pytest.approx(ALPHA, rel=0.05)
    assert fit.params["E"] == pytest.approx(E, rel=0.05)
    lo, hi = fit.intervals()["alpha"]
    assert lo <= fit.params["alpha"] <= hi and hi > lo


def test_chinchilla_fit_recovers_both_exponents_and_irreducible_loss_within_5_percent():
    rng = np.random.default_rng(3)
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 5), np.geomspace(1e8, 1e11, 5)))
    loss = (1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) * (1 + 0.002 * rng.standard_normal(n.size))
    fit = fit_with_bootstrap("chinchilla", np.stack([n, d], axis=1), loss, samples=30)
    got = fit.params
    assert (got["E"], got["alpha"], got["beta"]) == pytest.approx((1.69, 0.34, 0.28), rel=0.05)


def test_a_noiseless_law_is_fitted_exactly():
    flops = np.geomspace(1e14, 1e18, 6)
    fit = fit_with_bootstrap("compute", flops[:, None], compute_law(flops), samples=0)
    assert (fit.params["E"], fit.params["A"], fit.params["alpha"]) == pytest.approx((E, A, ALPHA), rel=1e-5)


def test_the_compute_frontier_drops_points_a_cheaper_one_beats():
    rows = [{"flops": 1.0, "val_loss": 3.0}, {"flops": 2.0, "val_loss": 3.1}, {"flops": 3.0, "val_loss": 2.5},
            {"flops": 4.0, "val_loss": 2.6}, {"flops": 5.0, "val_loss": 2.0}]
    assert [r["flops"] for r in compute_frontier(rows)] == [1.0, 3.0, 5.0]


def test_of_runs_of_equal_flops_only_the_lowest_loss_is_on_the_frontier():
    rows = [{"flops": 1.0, "val_loss": 3.0}, {"flops": 1.0, "val_loss": 2.9}, {"flops": 2.0, "val_loss": 2.8},
            {"flops": 2.0, "val_loss": 2.7}]
    assert [(r["flops"], r["val_loss"]) for r in compute_frontier(rows)] == [(1.0, 2.9), (2.0, 2.7)]


def test_holdout_names_a_key_of_the_rows():
    rows = [{"model.n_embd": "64", "val_loss": 2.0}, {"model.n_embd": "128", "val_loss": 1.9}]
    kept, held = split_holdout(rows, ["model.n_embd=128"])
    assert (len(kept), held[0]["val_loss"]) == (1, 1.9)
    with pytest.raises(UserError, match="model.n_layer"):
        split_holdout(rows, ["model.n_layer=4"])
    with pytest.raises(UserError, match="matches no finished point"):
        split_holdout(rows, ["model.n_embd=512"])


def sweep_dir(tmp_path, widths, name="sweep"):
    """A folder as `megagpt sweep` leaves it, its losses from the known law (sizes ∝ width²)."""
    rows = []
    for w in widths:
        params, tokens = 12 * 2 * w * w, 10_000_000
        flops = 6.0 * params * tokens
        rows.append({"model.n_embd": str(w), "point": f"n_embd={w}", "status": "done",
                     "val_loss": float(compute_law(flops)), "params": params, "tokens": tokens, "flops": flops})
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_fit_command_predicts_the_held_out_size(tmp_path, capsys):
    folder = sweep_dir(tmp_path, [64, 96, 128, 192, 256, 512])
    assert main(["scaling", "fit", str(folder), "--holdout", "model.n_embd=512", "--bootstrap", "20",
                 "--out", str(tmp_path / "fit")]) == 0
    result = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert "chinchilla" not in result  # every point has the same tokens
    held = result["compute"]["heldout"]
    assert [h["point"] for h in held] == ["n_embd=512"]
    assert abs(held[0]["rel_err"]) < 1e-4  # the law is exact: extrapolating it 4x in compute is too
    assert "n_embd=512" in capsys.readouterr().out
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (tmp_path / "fit" / "fit.png").stat().st_size > 0


def test_predict_counts_a_config_as_the_sweep_does_and_evaluates_the_law(tmp_path, capsys):
    flops = np.geomspace(1e10, 1e14, 6)
    fit = fit_with_bootstrap("compute", flops[:, None], compute_law(flops), samples=10)
    result = {"compute": {"theta": fit.theta.tolist(), "scale": fit.scale.tolist(),
                          "bootstrap_theta": fit.samples.tolist(), "formula": "..."}}
    (tmp_path / "fit.json").write_text(json.dumps(result))
    overrides = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
                 "model.vocab_size=65", "train.max_steps=100", "train.micro_batch_size=4"]
    cfg = load_config(None, overrides)
    point = config_point(cfg)
    model = GPT(cfg.model)
    assert point["params"] == model.num_params() == sum(p.numel() for p in model.parameters()) - 16 * 32
    assert point["tokens"] == 100 * 4 * 16
    assert point["flops"] == model.flops_per_token() * point["tokens"]
    best, lo, hi = predict(result, point)["compute"]
    assert best == pytest.approx(E + A * point["flops"] ** -ALPHA, rel=1e-5) and lo <= best <= hi
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert main(["scaling", "predict", str(tmp_path / "fit.json"), str(CPU_CONFIG), *sets]) == 0
    assert f"{best:.4f}" in capsys.readouterr().out


def test_too_few_points_for_the_law_is_one_line(tmp_path, capsys):
    folder = sweep_dir(tmp_path, [64, 128])
    assert main(["scaling", "fit", str(folder), "--out", str(tmp_path / "fit")]) == 2
    assert "at least 3 points" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path), "--out", str(tmp_path / "fit")]) == 2
    assert "neither a sweep folder" in capsys.readouterr().err


@pytest.mark.parametrize("text, says", [
    ('[{"val_loss', "results.json: not valid JSON"),
    ('{"rows": []}', "results.json: not a list of rows"),
    ('[{"val_loss": "low", "flops": 1}]', "results.json: row 1: val_loss is 'low', expected a number or null"),
])
def test_a_damaged_results_json_is_one_line(tmp_path, capsys, text, says):
    (tmp_path / "results.json").write_text(text)
    assert main(["scaling", "fit", str(tmp_path), "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/{says}" in err and err.count("\n") == 1


@pytest.mark.parametrize("text, says", [("not json", "JSONDecodeError"), ('{"compute": {}}', "KeyError: 'theta'"),
                                        ('{"law": {"theta": [1]}}', "KeyError"),
                                        ('{"compute": {"theta": [0, 1], "scale": [1], "bootstrap_theta": []}}',
                                         "ValueError: compute: theta needs 3 numbers and scale 1, got (2,)"),
                                        ('{"compute": {"theta": [0, 1, 0.3], "scale": [1, 2], "bootstrap_theta": []}}',
                                         "ValueError: compute: theta needs 3 numbers and scale 1, got (3,) and (2,)")])
def test_predict_from_a_damaged_fit_or_on_no_ranks_is_one_line(tmp_path, capsys, text, says):
    (tmp_path / "fit.json").write_text(text)
    assert main(["scaling", "predict", str(tmp_path), str(CPU_CONFIG), "--set", "model.vocab_size=65"]) == 2
    assert f"{tmp_path / 'fit.json'}: not a fit that `megagpt scaling fit` wrote ({says}" in capsys.readouterr().err
    assert main(["scaling", "predict", str(tmp_path), str(CPU_CONFIG), "--world-size", "0"]) == 2
    assert "--world-size 0: must be at least 1" in capsys.readouterr().err


def test_a_two_by_two_sweep_is_one_line_naming_the_frontier_and_what_to_sweep(tmp_path, capsys):
    """Two widths × two LRs: four runs, two FLOPs, so a 2-point frontier (it crashed in the bootstrap)."""
    rows = []
    for w in (32, 64):
        for lr, worse in (("0.002", 0.0), ("0.004", 0.1)):  # the worse LR second: both entered the frontier
            flops = 6.0 * 12 * w * w * 1e6
            rows.append({"model.n_embd": str(w), "train.lr": lr, "point": f"n_embd={w},lr={lr}", "status": "done",
                         "val_loss": float(compute_law(flops)) + worse, "params": 12 * w * w, "tokens": 1e6,
                         "flops": flops})
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "results.json").write_text(json.dumps(rows))
    assert main(["scaling", "fit", str(tmp_path / "sw"), "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "frontier has 2 points (of 4 finished runs" in err and "at least 3 points" in err
    assert "--grid model.n_embd=" in err
    assert not (tmp_path / "fit").exists()


def test_a_bootstrap_that_keeps_no_resample_is_an_error_not_empty_intervals(tmp_path, capsys):
    flops = np.array([1e13, 1e14, 1e15])  # a resample keeps all 3 distinct points with probability 2/9
    with pytest.raises(UserError, match="none of the 1 bootstrap resamples of the 3 points.*larger --bootstrap"):
        fit_with_bootstrap("compute", flops[:, None], compute_law(flops), samples=1, seed=0)
    fit = fit_with_bootstrap("compute", flops[:, None], compute_law(flops), samples=50, seed=0)
    assert 0 < len(fit.samples) < 50 and set(fit.intervals()) == {"E", "A", "alpha"}
    folder = sweep_dir(tmp_path, [64, 96, 128])
    assert main(["scaling", "fit", str(folder), "--bootstrap", "0", "--out", str(tmp_path / "fit")]) == 2
    assert "--bootstrap 0" in capsys.readouterr().err
