"""`megagpt doctor --full`: its parts within their limits and one budget, their commands valid before a GPU runs
them, the numbers read back from each part's own output, issue #14's goals judged on them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import wait_for
from helpers import REPO

from megagpt import doctor_full
from megagpt.doctor_checks import Result


def test_full_reads_the_benchmarks_goals_from_their_own_output(tmp_path):
    # The benchmark under the interpreter (toy sizes, CPU): the same files a GPU run writes. Both kernels' runs in
    # one child, its main() called once for each (one import of torch and Triton, not two).
    sizes = {"attention": ["--seq-len", "16", "--head-dim", "16"], "layernorm": ["--width", "64"]}
    runs = [["--kernel", kernel, "--quick", *flags, "--out", str(tmp_path / kernel)] for kernel, flags in sizes.items()]
    code = "import json, sys; from kernels.bench import main; sys.exit(max([main(a) for a in json.loads(sys.argv[1])]))"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True,
                            timeout=600, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    names = ("attention T=4096 D=128 bf16", "layernorm C=768..8192 bf16")
    attention, layer_norm = (doctor_full.part_numbers(name, tmp_path, "") for name in names)
    line = doctor_full.summarize_part(names[0], attention, "")
    assert line.startswith("triton fwd") and "x sdpa-math" in line
    line = doctor_full.summarize_part(names[1], layer_norm, "")
    assert "C=64:" in line and "of copy" in line and "x F.layer_norm" in line
    # the goals read the same numbers (here no matmul part ran; the interpreter's rates are toys)
    full = [Result(name, "PASS", "", numbers=n) for name, n in zip(names, (attention, layer_norm), strict=True)]
    goals = dict(line.split(" (", 1) for line in doctor_full.goal_lines(full))
    assert "no value (KeyError: 'bf16')" in goals["attention forward vs the measured bf16 matrix rate"]
    flash = attention["fwd_bwd_vs"]["sdpa-flash"]
    assert f": {flash:.3g}, " in goals["attention fwd+bwd vs SDPA's FlashAttention-2 backend"]
    worst = min(r["of_copy"] for r in layer_norm.values())
    assert f": {worst:.3g}, " in goals["LayerNorm forward vs copy bandwidth, worst C"]


def test_first_step_probe_times_a_cold_and_a_warm_step_of_each_config():
    # Under the interpreter at a toy shape: the same calls --full times on a GPU with a cold Triton cache.
    code = ("import json; from megagpt.doctor_full import first_step_probe; "
            "print(json.dumps(first_step_probe({'tiny': (1, 2, 16, 16, 0.1, 32)})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    name = "triton cold first step"
    line = doctor_full.summarize_part(name, doctor_full.part_numbers(name, REPO, result.stdout), result.stdout)
    assert line.startswith("tiny: first fwd+bwd ") and "(autotune, cold cache), then " in line


def test_full_runs_each_part_within_its_limit_and_the_budget(tmp_path):
    # run_full's own machinery on toy parts (a GPU runs the real ones through the same code): a part that
    # passes, one stopped at its limit (what it printed is kept, and its own child dies with it), one skipped
    # because the budget is spent
    py, pid_file = sys.executable, tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('so far so good', flush=True); time.sleep(300)")
    parts = [("echo part", [py, "-c", "print('hello from a part')"], 60), ("hang part", [py, "-c", hang], 6),
             ("late part", [py, "-c", "print('never')"], 60)]
    results = doctor_full.run_full(tmp_path, parts, budget_s=10)
    assert [(r.name, r.status) for r in results] == [("echo part", "PASS"), ("hang part", "FAIL"),
                                                     ("late part", "SKIP")]
    assert results[0].detail == "hello from a part"
    assert "still running after" in results[1].detail and results[1].seconds < 15
    assert (tmp_path / "hang.log").read_text() == "so far so good\n"
    assert "run it on its own: -c print('never')" in results[2].fix
    status = Path(f"/proc/{pid_file.read_text()}/status")
    # a SIGKILLed process is gone (or dead and not yet reaped) moments after the signal, not at once
    wait_for(lambda: "State:\tZ" in _read_or(status, "State:\tZ"), 10, "the part's child to die")


def _read_or(path: Path, missing: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return missing


def test_full_parts_commands_parse_as_their_programs_expect(tmp_path):
    # A GPU run is rare: a misspelt key or flag in a part must fail here, not there. Each `megagpt train`
    # part's config with its --set overrides validates; each benchmark's arguments parse.
    from kernels.bench import _parser
    from megagpt.config import load_config

    for name, cmd, _ in doctor_full.full_parts(tmp_path):
        cmd = [c.format(dataset=tmp_path / "dataset") for c in cmd]
        if cmd[1:4] == ["-m", "megagpt", "train"]:
            config = load_config(cmd[4], [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"])
            assert config.logging.progress_bar is False, name
        elif cmd[1:3] == ["-m", "kernels.bench"]:
            args = _parser().parse_args(cmd[3:])
            assert args.dtype == "bf16" and args.out.parent == tmp_path, name
        elif cmd[1] == "-c":  # an inline probe: valid Python that calls one of doctor_full's probes
            compile(cmd[2], name, "exec")
            probe = cmd[2].split("from megagpt.doctor_full import ")[1].split(";")[0]
            assert callable(getattr(doctor_full, probe)), name
        else:
            assert cmd[1:6] == ["-m", "pytest", "-q", "-m", "gpu"], name


def test_the_matrix_rate_probe_is_read_back_as_its_part():
    code = "import json; from megagpt.doctor_full import matmul_probe; print(json.dumps(matmul_probe(256)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = doctor_full.part_numbers("bf16 matmul rate", REPO, "a warning first\n" + result.stdout)
    assert numbers["n"] == 256 and 1e-4 < numbers["tflops"] < 10  # 33.6 MFLOP timed on 2 CPU cores
    line = doctor_full.summarize_part("bf16 matmul rate", numbers, "")
    assert line.endswith("TFLOP/s on random 256x256x256 products")


@pytest.mark.parametrize(
    "numbers, verdicts",
    [({"attention": {"fwd_tflops": 400.0, "fwd_bwd_vs": {"sdpa-flash": 1.1}}, "bf16": {"tflops": 780.0},
       "layernorm": {768: {"of_copy": 0.85, "vs_torch": 1.6}, 8192: {"of_copy": 0.79, "vs_torch": 2.0}},
       "gpt3_125m": {"mfu": 0.45}, "shakespeare_char": {"val_loss": 1.4701}},
      ["met", "met", "NOT met", "met", "met", "NOT met"]),
     ({"attention": {"fwd_tflops": 390.0, "fwd_bwd_vs": {"sdpa-flash": 0.99}}, "bf16": {"tflops": 780.0},
       "layernorm": {}, "gpt3_125m": {}, "shakespeare_char": {"val_loss": 1.47}},
      ["NOT met", "NOT met", "no value", "no value", "no value", "met"])],
)
def test_goals_are_judged_on_the_parts_numbers_at_their_bounds(numbers, verdicts):
    # the bounds: >= 1.0x flash, > 50% of the matrix rate, >= 80% of copy and >= 1.5x F.layer_norm at
    # the worst width, >= 45% MFU, val loss <= 1.47; a part with no such number gives no value, not a verdict
    full = [Result(part + " part", "PASS", "", numbers=n) for part, n in numbers.items()]
    lines = doctor_full.goal_lines(full)
    assert [("no value" if "no value" in line else line.rsplit(", ", 1)[1]) for line in lines] == verdicts
    assert "NOT met" not in "".join(doctor_full.goal_lines([Result("attention x", "FAIL", "")]))  # failed: no value


def test_a_training_parts_numbers_are_medians_after_its_first_step_and_its_last_val_loss(tmp_path):
    # metrics.jsonl as megagpt train writes it: the first step (compiling, autotuning) is left out, a lucky step
    # does not decide MFU or tokens/s, the val loss is the last evaluation's
    rows = [{"step": 1, "loss": 4.0, "tokens_per_sec": 10.0, "mfu": 0.01},
            *({"step": s, "loss": 3.0, "tokens_per_sec": t, "mfu": m}
              for s, t, m in [(2, 100.0, 0.40), (3, 300.0, 0.90), (4, 110.0, 0.44)]),
            {"step": 4, "val_loss": 2.5}, {"step": 8, "val_loss": 2.25}]
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    numbers = doctor_full.part_numbers("shakespeare_char to val loss", tmp_path, "")
    assert numbers == {"steps": 4, "tokens_per_sec": 110.0, "mfu": 0.44, "val_loss": 2.25}
    assert doctor_full.summarize_part("shakespeare_char to val loss", numbers, "") == \
        "4 steps logged, 110 tokens/s (median), MFU 0.44 (median), val loss 2.250"


def test_full_again_in_its_own_out_replaces_each_parts_old_folder(tmp_path):
    # a training part's old run dir would be resumed (a finished one: its old numbers read back as new ones)
    old = tmp_path / "echo" / "old_result"
    probe = f"import os; print('old result there:', os.path.exists({str(old)!r}))"
    part = [("echo part", [sys.executable, "-c", probe], 30)]
    doctor_full.run_full(tmp_path, part, budget_s=30)  # first run: marks the folder as doctor's
    old.parent.mkdir()
    old.write_text("from an earlier doctor")
    assert doctor_full.run_full(tmp_path, part, budget_s=30)[0].detail == "old result there: False"
