"""`megagpt doctor`: a line per check, exit 0 only when all that applies passed, what to do on failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import wait_for
from helpers import REPO

from megagpt import doctor, hardware
from megagpt.doctor import Result


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "megagpt.doctor", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)


@pytest.mark.slow  # a gloo pair, the interpreter's kernels and 20 DeepSpeed steps: 1-1.5 minutes on 2 cores
def test_doctor_on_this_cpu_passes_every_check_with_a_line_each():
    result = _run()
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for name in ["versions", "devices", "bf16", "collective", "triton attention", "triton layer_norm",
                 "tiny training"]:
        line = next(line for line in lines if line.startswith(name))
        assert " PASS " in line, line
    training = next(line for line in lines if line.startswith("tiny training"))
    assert "20 steps through DeepSpeed" in training and "checkpoints step_000010, step_000020" in training
    assert lines[-1] == "7 passed, 0 failed"


def _broken() -> Result:
    return Result("broken", "FAIL", "deliberately broken", "fix the deliberate break")


def check_raises() -> Result:
    raise OSError("no such device")


def test_a_failing_check_exits_non_zero_with_what_to_do(capsys):
    assert doctor.main([], checks=[doctor.check_bf16, _broken, check_raises]) == 1
    out = capsys.readouterr().out
    assert "bf16" in out and " PASS " in out.splitlines()[1]
    assert "broken" in out and "what to do: fix the deliberate break" in out
    raised = next(line for line in out.splitlines() if line.startswith("raises"))
    assert " FAIL " in raised and "OSError: no such device" in raised
    assert "what to do: an unexpected error at test_doctor.py" in out
    assert out.splitlines()[-1] == "1 passed, 2 failed"


def test_only_passing_checks_exit_zero(capsys):
    assert doctor.main([], checks=[doctor.check_bf16, doctor.check_devices]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 passed, 0 failed"


@pytest.mark.skipif(doctor._has_cuda(), reason="on a GPU --full runs for real")
def test_full_on_a_cpu_says_it_needs_a_gpu_and_what_it_would_run(capsys, tmp_path):
    assert doctor.main(["--full", "--out", str(tmp_path)], checks=[doctor.check_bf16]) == 0
    out = capsys.readouterr().out
    assert "--full needs a CUDA GPU" in out
    for part in ["pytest -m gpu", "triton cold first step", "attention T=4096 D=128 bf16",
                 "layernorm C=768..8192 bf16", "gpt3_125m step time", "shakespeare_char to val loss", "8 minutes"]:
        assert part in out
    assert not (tmp_path / "report.md").exists()


def test_missing_packages_fail_versions_with_the_install_line_and_skip_training():
    # The GPU machine's image lacks these three: hide them from the import system, as there, and run the checks.
    code = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("deepspeed", "webdataset", "pydantic"):
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Hide())
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in ("deepspeed", "webdataset", "pydantic") else real(name, *a)
from megagpt import doctor
sys.exit(doctor.main([], checks=[doctor.check_versions, doctor.check_training]))
"""
    result = _run(code=code)
    assert result.returncode == 1, result.stderr[-2000:]
    versions = next(line for line in result.stdout.splitlines() if line.startswith("versions"))
    assert " FAIL " in versions and "missing: deepspeed, webdataset, pydantic" in versions
    assert "what to do: pip install deepspeed webdataset pydantic" in result.stdout
    training = next(line for line in result.stdout.splitlines() if line.startswith("tiny training"))
    assert " SKIP " in training and "needs deepspeed, webdataset, pydantic" in training


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", ["avx512_bf16", "amx_bf16", "amx_tile"]),
    ("fpu sse avx2 avx512f avx512bw", []),
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, expected):
    cpuinfo = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert hardware.cpu_bf16_flags(cpuinfo) == expected


@pytest.mark.parametrize("flags,native", [("fpu avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                                          ("fpu avx2 avx512f avx512bw avx512_vnni", False)])
def test_dtype_auto_follows_this_cpus_flags(flags, native, monkeypatch):
    """Without CUDA, native_bf16 reads /proc/cpuinfo's flags, and auto becomes bf16 exactly where it is native."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpuinfo", lambda: f"processor\t: 0\nflags\t\t: {flags}\n")
    assert hardware.native_bf16() is native
    assert hardware.resolve_dtype("auto") == ("bf16" if native else "fp32")
    assert [hardware.resolve_dtype(d) for d in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_full_reads_the_benchmarks_goals_from_their_own_output(tmp_path):
    # The benchmark under the interpreter (toy sizes, CPU): the same files a GPU run writes.
    for kernel in ("attention", "layernorm"):
        result = subprocess.run([sys.executable, "-m", "kernels.bench", "--kernel", kernel, "--quick", "--seq-len",
                                 "16", "--head-dim", "16", "--width", "64", "--out", str(tmp_path / kernel)],
                                capture_output=True, text=True, timeout=600, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
    names = ("attention T=4096 D=128 bf16", "layernorm C=768..8192 bf16")
    attention, layer_norm = (doctor.part_numbers(name, tmp_path, "") for name in names)
    line = doctor.summarize_part(names[0], attention, "")
    assert line.startswith("triton fwd") and "x sdpa-math" in line
    line = doctor.summarize_part(names[1], layer_norm, "")
    assert "C=64:" in line and "of copy" in line and "x F.layer_norm" in line
    # the goals read the same numbers (here no matmul part ran; the interpreter's rates are toys)
    full = [Result(name, "PASS", "", numbers=n) for name, n in zip(names, (attention, layer_norm), strict=True)]
    goals = dict(line.split(" (", 1) for line in doctor.goal_lines(full))
    assert "no value (KeyError: 'bf16')" in goals["attention forward vs the measured bf16 matrix rate"]
    flash = attention["fwd_bwd_vs"]["sdpa-flash"]
    assert f": {flash:.3g}, " in goals["attention fwd+bwd vs SDPA's FlashAttention-2 backend"]
    worst = min(r["of_copy"] for r in layer_norm.values())
    assert f": {worst:.3g}, " in goals["LayerNorm forward vs copy bandwidth, worst C"]


def test_first_step_probe_times_a_cold_and_a_warm_step_of_each_config():
    # Under the interpreter at a toy shape: the same calls --full times on a GPU with a cold Triton cache.
    code = ("import json; from megagpt.doctor import first_step_probe; "
            "print(json.dumps(first_step_probe({'tiny': (1, 2, 16, 16, 0.1, 32)})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    name = "triton cold first step"
    line = doctor.summarize_part(name, doctor.part_numbers(name, REPO, result.stdout), result.stdout)
    assert line.startswith("tiny: first fwd+bwd ") and "(autotune, cold cache), then " in line


@pytest.mark.parametrize(
    "triton, numpy, names_the_pair",
    [("3.6.0", "2.5.2", True), ("3.6.0+git3f1e", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False)],
)
def test_the_interpreter_fix_names_triton_before_3_7_with_numpy_2_4(triton, numpy, names_the_pair):
    # Triton 3.6's interpreter does int(one_element_array), which numpy 2.4 refuses (seen with the GPU image's
    # triton 3.6.0 and numpy 2.5.2: every kernel test failed under the interpreter; numpy 2.3.5 passed them all)
    fix = doctor.interpreter_fix(triton, numpy)
    assert ("pip install 'triton>=3.7'" in fix and triton in fix and numpy in fix) is names_the_pair
    assert ("reinstall triton" in fix) is not names_the_pair


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
    results = doctor.run_full(tmp_path, parts, budget_s=10)
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

    for name, cmd, _ in doctor.full_parts(tmp_path):
        cmd = [c.format(dataset=tmp_path / "dataset") for c in cmd]
        if cmd[1:4] == ["-m", "megagpt", "train"]:
            config = load_config(cmd[4], [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"])
            assert config.logging.progress_bar is False, name
        elif cmd[1:3] == ["-m", "kernels.bench"]:
            args = _parser().parse_args(cmd[3:])
            assert args.dtype == "bf16" and args.out.parent == tmp_path, name
        elif cmd[1] == "-c":  # an inline probe: valid Python that calls one of doctor's probes
            compile(cmd[2], name, "exec")
            probe = cmd[2].split("from megagpt.doctor import ")[1].split(";")[0]
            assert callable(getattr(doctor, probe)), name
        else:
            assert cmd[1:6] == ["-m", "pytest", "-q", "-m", "gpu"], name


def test_the_matrix_rate_probe_is_read_back_as_its_part():
    code = "import json; from megagpt.doctor import matmul_probe; print(json.dumps(matmul_probe(256)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = doctor.part_numbers("bf16 matmul rate", REPO, "a warning first\n" + result.stdout)
    assert numbers["n"] == 256 and 1e-4 < numbers["tflops"] < 10  # 33.6 MFLOP timed on 2 CPU cores
    assert doctor.summarize_part("bf16 matmul rate", numbers, "").endswith("TFLOP/s on random 256x256x256 products")


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
    lines = doctor.goal_lines(full)
    assert [("no value" if "no value" in line else line.rsplit(", ", 1)[1]) for line in lines] == verdicts
    assert "NOT met" not in "".join(doctor.goal_lines([Result("attention x", "FAIL", "")]))  # failed: no value


def test_a_training_parts_numbers_are_medians_after_its_first_step_and_its_last_val_loss(tmp_path):
    # metrics.jsonl as megagpt train writes it: the first step (compiling, autotuning) is left out, a lucky step
    # does not decide MFU or tokens/s, the val loss is the last evaluation's
    rows = [{"step": 1, "loss": 4.0, "tokens_per_sec": 10.0, "mfu": 0.01},
            *({"step": s, "loss": 3.0, "tokens_per_sec": t, "mfu": m}
              for s, t, m in [(2, 100.0, 0.40), (3, 300.0, 0.90), (4, 110.0, 0.44)]),
            {"step": 4, "val_loss": 2.5}, {"step": 8, "val_loss": 2.25}]
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    numbers = doctor.part_numbers("shakespeare_char to val loss", tmp_path, "")
    assert numbers == {"steps": 4, "tokens_per_sec": 110.0, "mfu": 0.44, "val_loss": 2.25}
    assert doctor.summarize_part("shakespeare_char to val loss", numbers, "") == \
        "4 steps logged, 110 tokens/s (median), MFU 0.44 (median), val loss 2.250"
