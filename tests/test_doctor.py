"""`megagpt doctor`: a line per check, exit 0 only when all that applies passed, what to do on failure."""

import os
import subprocess
import sys
import tarfile

import pytest
from helpers import REPO

from megagpt import doctor, doctor_checks, hardware
from megagpt.cli import main as cli_main
from megagpt.doctor_checks import Result


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "megagpt.doctor", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)


@pytest.mark.slow  # a gloo pair, the interpreter's kernels and 20 DeepSpeed steps: 15-90 s on 2 cores
def test_doctor_on_this_cpu_passes_every_check_with_a_line_each_through_the_prepared_device_check(tmp_path):
    """launch/device_check.sh, the one command a lent GPU machine runs (`doctor --full`), here on the CPU: every
    check that applies passes, --full says what it would add on a GPU, and the files a device call brings back
    are packed. Its doctor.log is doctor's output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEVICE_CHECK_S": "600",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}  # its python3
    result = subprocess.run(["bash", str(REPO / "launch" / "device_check.sh"), str(tmp_path / "dest")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    lines = (tmp_path / "dest" / "doctor.log").read_text().splitlines()
    for name in ["versions", "devices", "bf16", "collective", "triton attention", "triton layer_norm",
                 "tiny training"]:
        line = next(line for line in lines if line.startswith(name))
        assert " PASS " in line, line
    training = next(line for line in lines if line.startswith("tiny training"))
    assert "20 steps through DeepSpeed" in training and "checkpoints step_000010, step_000020" in training
    assert "7 passed, 0 failed" in lines and any(line.startswith("--full needs a CUDA GPU") for line in lines)
    with tarfile.open(tmp_path / "dest" / "doctor_files.tar.gz") as packed:
        assert not [name for name in packed.getnames() if "checkpoints" in name]  # no checkpoints come back
    assert (tmp_path / "dest" / "nvidia-smi.txt").is_file()


def _broken() -> Result:
    return Result("broken", "FAIL", "deliberately broken", "fix the deliberate break")


def check_raises() -> Result:
    raise OSError("no such device")


def test_a_failing_check_exits_non_zero_with_what_to_do(capsys):
    assert doctor.main([], checks=[doctor_checks.check_bf16, _broken, check_raises]) == 1
    out = capsys.readouterr().out
    assert "bf16" in out and " PASS " in out.splitlines()[1]
    assert "broken" in out and "what to do: fix the deliberate break" in out
    raised = next(line for line in out.splitlines() if line.startswith("raises"))
    assert " FAIL " in raised and "OSError: no such device" in raised
    assert "what to do: an unexpected error at test_doctor.py" in out
    assert out.splitlines()[-1] == "1 passed, 2 failed"


def test_only_passing_checks_exit_zero(capsys):
    assert doctor.main([], checks=[doctor_checks.check_bf16, doctor_checks.check_devices]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 passed, 0 failed"


@pytest.mark.parametrize("flag", [["--out", "somewhere"], ["--time-limit", "60"]])
def test_fulls_options_without_full_are_refused(flag, capsys):
    # without --full doctor writes no report and keeps no time: the flag would be silently ignored
    assert cli_main(["doctor", *flag]) == 2
    err = capsys.readouterr().err
    assert "--out and --time-limit are --full's" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(doctor_checks.has_cuda(), reason="on a GPU --full runs for real")
def test_full_on_a_cpu_says_it_needs_a_gpu_and_what_it_would_run(capsys, tmp_path):
    assert doctor.main(["--full", "--out", str(tmp_path)], checks=[doctor_checks.check_bf16]) == 0
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
from megagpt import doctor, doctor_checks
sys.exit(doctor.main([], checks=[doctor_checks.check_versions, doctor_checks.check_training]))
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


@pytest.mark.parametrize(
    "triton, numpy, names_the_pair",
    [("3.6.0", "2.5.2", True), ("3.6.0+git3f1e", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False)],
)
def test_the_interpreter_fix_names_triton_before_3_7_with_numpy_2_4(triton, numpy, names_the_pair):
    # Triton 3.6's interpreter does int(one_element_array), which numpy 2.4 refuses (seen with the GPU image's
    # triton 3.6.0 and numpy 2.5.2: every kernel test failed under the interpreter; numpy 2.3.5 passed them all)
    fix = doctor_checks.interpreter_fix(triton, numpy)
    assert ("pip install 'triton>=3.7'" in fix and triton in fix and numpy in fix) is names_the_pair
    assert ("reinstall triton" in fix) is not names_the_pair


@pytest.mark.parametrize("limit", ["nan", "0", "-5", "inf"])
def test_a_time_limit_that_is_no_positive_number_is_refused(limit):
    from megagpt.errors import UserError

    with pytest.raises(UserError, match=f"--time-limit {float(limit)}: must be a number of seconds above 0"):
        doctor.main(["--full", "--time-limit", limit], checks=[])


def test_full_refuses_an_out_that_is_a_file_or_someone_elses_folder_before_any_check(tmp_path):
    from megagpt.errors import UserError

    ran = []

    def check_ran():
        ran.append(1)
        return Result("ran", "PASS", "")

    (tmp_path / "file").write_text("mine")
    (tmp_path / "runs" / "shakespeare_char").mkdir(parents=True)  # a real run a part would resume
    with pytest.raises(UserError, match="is a file"):
        doctor.main(["--full", "--out", str(tmp_path / "file")], checks=[check_ran])
    with pytest.raises(UserError, match="doctor did not make"):
        doctor.main(["--full", "--out", str(tmp_path / "runs")], checks=[check_ran])
    assert not ran and not any((tmp_path / "runs" / "shakespeare_char").iterdir())
