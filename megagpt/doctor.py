"""`megagpt doctor [--full] [--out DIR] [--time-limit S]`: check a new machine or cluster, one line per check.

Checks: versions and missing packages, devices and their known peaks, native bf16, a collective across local
devices (gloo on CPU, NCCL on GPUs), each Triton kernel against kernels.reference on this device, and 20 steps
of a tiny training through DeepSpeed; each failure says what to do. `--full` (a GPU) adds the GPU tests, the
kernels' cold first step, the bf16 matrix rate, kernel benchmarks, a gpt3_125m step-time/MFU probe and the
whole shakespeare_char run, within 8 minutes, judges issue #14's goals on them and writes a Markdown report.
Exit 0 only if every check that applies passed. Imports only the standard library at the top, so it also
runs where megagpt's own dependencies are missing, and says which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import operator
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megagpt import hardware  # no torch at import: doctor reports a missing torch itself

PACKAGES = {  # import name -> distribution name, as pyproject.toml lists them
    "torch": "torch", "triton": "triton", "deepspeed": "deepspeed", "webdataset": "webdataset",
    "pydantic": "pydantic", "yaml": "pyyaml", "numpy": "numpy", "sentencepiece": "sentencepiece",
    "tensorboard": "tensorboard", "tqdm": "tqdm", "safetensors": "safetensors",
}
TRAINING_NEEDS = ("torch", "deepspeed", "webdataset", "pydantic", "yaml", "numpy")
FULL_BUDGET_S = 8 * 60
ROOT = Path(__file__).resolve().parents[1]  # a source checkout: configs/ and tests/ live here


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    fix: str = ""  # what to do, on failure
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)  # a --full part's measurements (part_numbers)


def _missing() -> list[str]:
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env(**extra: str) -> dict:
    """The environment for child processes: this checkout importable, plus `extra`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# ---------------------------------------------------------------------------------------------
# The checks: each returns one Result (or several); an exception is a FAIL with its first line
# ---------------------------------------------------------------------------------------------
def check_versions() -> Result:
    missing = _missing()
    cuda = "none"
    if "torch" not in missing:
        import torch

        cuda = torch.version.cuda or "none"
    detail = (f"python {platform.python_version()}, torch {_version('torch')} (CUDA {cuda}), triton "
              f"{_version('triton')}, deepspeed {_version('deepspeed')}")
    if missing:
        dists = " ".join(PACKAGES[m] for m in missing)
        return Result("versions", "FAIL", f"{detail}; missing: {', '.join(missing)}",
                      f"pip install {dists} (or pip install -e . in the checkout)")
    return Result("versions", "PASS", detail)


def check_devices() -> Result:
    import torch

    if not torch.cuda.is_available():
        return Result("devices", "PASS", f"no CUDA device; CPU: {_cpu_name()}, {os.cpu_count()} cores, "
                                         f"torch threads {torch.get_num_threads()}")
    parts = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpu = hardware.gpu_from_device_name(props.name)
        peak = (f"{gpu.bf16_tflops:g} TFLOP/s bf16 dense (as {gpu.name})" if gpu else
                "peak unknown to megagpt: set logging.peak_flops for MFU")
        parts.append(f"{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}, {peak}")
    return Result("devices", "PASS", "; ".join(parts))


def _cpu_name() -> str:
    for line in hardware.cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def check_bf16() -> Result:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        native = hardware.native_bf16()
        detail = f"sm_{major}{minor}: bf16 tensor cores {'yes' if native else 'no (needs sm_80+): use fp16'}"
        return Result("bf16", "PASS", detail)
    flags = hardware.cpu_bf16_flags(hardware.cpuinfo())
    capability = torch.backends.cpu.get_cpu_capability()
    if flags:
        return Result("bf16", "PASS", f"native on this CPU ({', '.join(flags)}; torch uses {capability})")
    return Result("bf16", "PASS", f"not native on this CPU (no AVX-512 BF16 / AMX; torch uses {capability}): "
                                  "bf16 is emulated, slower than fp32; train.dtype auto picks fp32 here")


def _collective_worker(rank: int, world: int, port: int, backend: str, queue) -> None:
    """One rank: all_reduce and all_gather of known tensors; puts (rank, ok, detail) on the queue."""
    try:
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x)
        gathered = [torch.empty(1, device=device) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([float(rank)], device=device))
        ok = bool((x == world * (world + 1) / 2).all()) and [g.item() for g in gathered] == list(range(world))
        dist.destroy_process_group()
        queue.put((rank, ok, "all_reduce and all_gather correct" if ok else "wrong result"))
    except Exception as e:  # noqa: BLE001  reported to the parent, which turns it into FAIL
        queue.put((rank, False, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))


def check_collective() -> Result:
    import multiprocessing

    import torch

    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    world = torch.cuda.device_count() if on_gpu else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_collective_worker, args=(r, world, port, backend, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(queue.get(timeout=120))
    except Exception:  # noqa: BLE001  queue.Empty: a rank hung
        results.append((-1, False, "a rank did not answer within 120 s"))
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    bad = [r for r in results if not r[1]]
    where = f"{backend}, {world} process(es) on 127.0.0.1" + (", one per GPU" if on_gpu else "")
    if bad or len(results) < world:
        fix = ("check NCCL: nvidia-smi topo -m, NCCL_DEBUG=INFO; NCCL_P2P_DISABLE=1 if peer access fails"
               if on_gpu else "check that 127.0.0.1 accepts local TCP connections (firewall, container network)")
        return Result("collective", "FAIL", f"{where}: " + "; ".join(r[2] for r in bad or results), fix)
    return Result("collective", "PASS", f"{where}: all_reduce and all_gather correct")


def kernel_probe() -> list[dict]:
    """Runs in a child process (TRITON_INTERPRET=1 set before triton loads, on CPU): each kernel's output and
    gradients against kernels.reference in float64, at one small size on this device."""
    import torch

    import kernels
    from kernels.reference import causal_attention_reference, layer_norm_reference

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    tolerance = 3e-2 if on_gpu else 1e-4  # relative L2 error: bf16 rounding, or fp32 (IEEE dots) exactness
    g = torch.Generator().manual_seed(0)
    cases = {
        "attention": (lambda q, k, v: kernels.causal_attention(q, k, v), causal_attention_reference,
                      [torch.randn(1, 2, 80 if on_gpu else 40, 64 if on_gpu else 32, generator=g) for _ in range(3)]),
        "layer_norm": (kernels.layer_norm, layer_norm_reference,
                       [torch.randn(16, 768 if on_gpu else 200, generator=g), torch.randn(768 if on_gpu else 200,
                        generator=g), torch.randn(768 if on_gpu else 200, generator=g)]),
    }
    results = []
    for name, (fn, reference, inputs) in cases.items():
        started = time.perf_counter()
        try:
            ours = [x.to(device, dtype).detach().clone().requires_grad_() for x in inputs]
            ref = [x.double().detach().requires_grad_() for x in inputs]
            out, want = fn(*ours), reference(*ref)
            dout = torch.randn(want.shape, generator=g, dtype=torch.float64)
            out.backward(dout.to(device, dtype))
            want.backward(dout)
            pairs = [(out, want)] + [(a.grad, b.grad) for a, b in zip(ours, ref, strict=True)]
            err = max(((a.double().cpu() - b).norm() / b.norm()).item() for a, b in pairs)
            results.append({"name": name, "ok": err <= tolerance, "error": err, "tolerance": tolerance,
                            "seconds": time.perf_counter() - started, "dtype": str(dtype).removeprefix("torch."),
                            "shape": list(inputs[0].shape)})
        except Exception as e:  # noqa: BLE001
            results.append({"name": name, "ok": False, "exception": f"{type(e).__name__}: {str(e)[:200]}",
                            "seconds": time.perf_counter() - started})
    return results


def check_kernels() -> list[Result]:
    on_gpu = _has_cuda()
    env = _env() if on_gpu else _env(TRITON_INTERPRET="1")
    code = "import json; from megagpt.doctor import kernel_probe; print(json.dumps(kernel_probe()))"
    how = "compiled for this GPU" if on_gpu else "under Triton's CPU interpreter"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        fix = "run python -m pytest tests/test_kernels_attention.py -x for the full error"
        return [Result("triton kernels", "FAIL", f"{how}: the probe crashed: {tail}",
                       fix if on_gpu else interpreter_fix())]
    out = []
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        name = f"triton {r['name']}"
        if "exception" in r:
            fix = ("check the CUDA driver and that triton matches torch (pip show triton torch)" if on_gpu else
                   interpreter_fix())
            out.append(Result(name, "FAIL", f"{how}: {r['exception']}", fix, r["seconds"]))
            continue
        detail = (f"{how}, {r['dtype']} {tuple(r['shape'])}: output and gradients within {r['error']:.1e} of "
                  f"float64 (tolerance {r['tolerance']:.0e})")
        fix = "" if r["ok"] else "a wrong kernel result: report it with this line and `megagpt doctor` output"
        out.append(Result(name, "PASS" if r["ok"] else "FAIL", detail, fix, r["seconds"]))
    return out


def interpreter_fix(triton: str | None = None, numpy: str | None = None) -> str:
    """What to do when Triton's CPU interpreter fails. Triton before 3.7 turns one-element arrays into ints,
    which numpy 2.4 and later refuse ("only 0-dimensional arrays can be converted to Python scalars")."""
    triton = triton or _version("triton")
    numpy = numpy or _version("numpy")
    if _major_minor(triton) < (3, 7) and _major_minor(numpy) >= (2, 4):
        return (f"triton {triton}'s CPU interpreter cannot run with numpy {numpy}: "
                "pip install 'triton>=3.7' (or 'numpy<2.4')")
    return "the interpreter failed: reinstall triton"


def _major_minor(version: str) -> tuple[int, int]:
    """(3, 6) of "3.6.0+git1234"; (0, 0) of anything without a leading major.minor."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


SYNTHETIC_LINES = ["the cat sat on the mat.", "a dog ran to the park.", "we go home at noon.", "it is a fine day."]


def write_synthetic_text(path: Path, kilobytes: int) -> Path:
    """Deterministic, learnable text: a few sentences in a fixed rotation."""
    lines, size, i = [], 0, 0
    while size < kilobytes * 1024:
        line = SYNTHETIC_LINES[i % len(SYNTHETIC_LINES)] + (" again" * (i % 3))
        lines.append(line)
        size += len(line) + 1
        i += 1
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_dataset(work: Path, kilobytes: int) -> Path:
    """A char-level dataset of synthetic text, by data_prep.prepare in a child process (megagpt/ itself never
    imports data_prep: only the CLI layer may)."""
    text = write_synthetic_text(work / "corpus.txt", kilobytes)
    out = work / "dataset"
    code = ("import sys; from data_prep import PrepSettings, prepare; "
            "prepare([sys.argv[1]], sys.argv[2], PrepSettings(tokenizer='char'))")
    proc = subprocess.run([sys.executable, "-c", code, str(text), str(out)], capture_output=True, text=True,
                          env=_env(), timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RuntimeError(f"data_prep.prepare failed: {tail}")
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


TINY_STEPS = 20


def check_training() -> Result:
    missing = [m for m in TRAINING_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return Result("tiny training", "SKIP", f"needs {', '.join(missing)} (see versions)")
    with tempfile.TemporaryDirectory(prefix="megagpt_doctor_") as tmp:
        work = Path(tmp)
        dataset = prepare_dataset(work, kilobytes=16)
        config = work / "doctor.yaml"
        config.write_text("name: doctor\n")
        sets = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "model.dropout=0.0",
                f"data.dataset_dir={dataset}", f"train.max_steps={TINY_STEPS}", "train.micro_batch_size=8",
                "train.eval_interval=10", "train.eval_steps=2", "train.log_interval=5",
                "train.checkpoint_interval=10", "train.sample_tokens=8", "train.warmup_steps=2",
                "logging.progress_bar=false", "logging.tensorboard=false"]
        run_dir = work / "run"
        cmd = [sys.executable, "-m", "megagpt", "train", str(config), "--run-dir", str(run_dir), *_sets(*sets)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return Result("tiny training", "FAIL", f"megagpt train exited {proc.returncode}: {tail}",
                          "see the whole log: megagpt train CONFIG " + " ".join(cmd[5:]))
        metrics = read_metrics(run_dir)
        losses = [m["loss"] for m in metrics if "loss" in m]
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        steps = max((m["step"] for m in metrics if "loss" in m), default=0)
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        ok = steps == TINY_STEPS and len(losses) >= 2 and losses[-1] < losses[0] and vals and checkpoints
        detail = (f"{steps} steps through DeepSpeed (ZeRO 0): loss {losses[0]:.2f} -> {losses[-1]:.2f}, val "
                  f"{vals[-1]:.2f}, checkpoints {', '.join(checkpoints)}" if losses and vals else
                  f"metrics.jsonl has {len(metrics)} records, no loss/val_loss")
        return Result("tiny training", "PASS" if ok else "FAIL", detail,
                      "" if ok else "the loss did not fall or records are missing: look at the run's metrics")


CHECKS: list[Callable] = [check_versions, check_devices, check_bf16, check_collective, check_kernels,
                          check_training]
NEEDS_TORCH = {check_devices, check_bf16, check_collective, check_kernels, check_training}


def run_checks(checks: list[Callable]) -> list[Result]:
    """Each check timed, printed as it finishes; an exception becomes a FAIL naming it."""
    results = []
    for check in checks:
        started = time.perf_counter()
        try:
            if check in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
                out = Result(check.__name__.removeprefix("check_"), "SKIP", "needs torch (see versions)")
            else:
                out = check()
        except Exception as e:  # noqa: BLE001  one failing check must not hide the others
            last = traceback.extract_tb(e.__traceback__)[-1]
            out = Result(check.__name__.removeprefix("check_"), "FAIL", f"{type(e).__name__}: {e}"[:240],
                         f"an unexpected error at {Path(last.filename).name}:{last.lineno}: rerun with "
                         "python -m megagpt.doctor and report the message")
        elapsed = time.perf_counter() - started
        for r in out if isinstance(out, list) else [out]:
            r.seconds = r.seconds or elapsed
            print(format_line(r), flush=True)
            results.append(r)
    return results


def format_line(r: Result) -> str:
    line = f"{r.name:<18} {r.status:<4} {r.seconds:6.1f} s  {r.detail}"
    return line + (f"\n{'':18} what to do: {r.fix}" if r.status == "FAIL" and r.fix else "")


# ---------------------------------------------------------------------------------------------
# --full: the GPU parts, each timed within one budget, and the Markdown report
# ---------------------------------------------------------------------------------------------
FIRST_STEPS = {  # the triton kernels' shapes in the first step of two configs: (B, H, T, D, dropout, C)
    "shakespeare_char": (8, 6, 256, 64, 0.2, 384),
    "gpt3_125m": (2, 12, 2048, 64, 0.0, 768),
}


def first_step_probe(shapes: dict | None = None) -> dict:
    """Runs in a child with an empty TRITON_CACHE_DIR: seconds of the first (autotuning, compiling) and second
    forward+backward of each config's attention and LayerNorm, with the default pruned search. On a CPU (the
    interpreter: tests only) in fp32."""
    import torch

    import kernels

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    times = {}
    for name, (B, H, T, D, p, C) in (shapes or FIRST_STEPS).items():
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        x = torch.randn(B * T, C, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(C, device=device, dtype=dtype, requires_grad=True)
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            kernels.causal_attention(q, k, v, dropout_p=p).sum().backward()
            kernels.layer_norm(x, w, None).sum().backward()
            if on_gpu:
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - started)
        times[name] = runs
    return times


def matmul_probe(n: int = 8192) -> dict:
    """The dense bf16 matrix rate on random data (an n x n x n product, triton's do_bench), the ceiling the
    attention forward is judged against. On a CPU (tests only) fp32, timed by perf_counter."""
    import torch

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if on_gpu:
        import triton.testing

        ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)
    else:
        a @ b
        started = time.perf_counter()
        a @ b
        ms = (time.perf_counter() - started) * 1e3
    return {"n": n, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def full_parts(out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) for each part of --full; the last gets whatever budget is left."""
    py = sys.executable
    probe = "import json; from megagpt.doctor import first_step_probe; print(json.dumps(first_step_probe()))"
    pytest = [py, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")]
    if importlib.util.find_spec("xdist") is not None:  # compiling 153 kernel configs dominates: 4 at a time
        pytest += ["-n", "4"]
    return [
        ("pytest -m gpu", pytest, 150),
        ("triton cold first step", [py, "-c", probe], 90),
        ("bf16 matmul rate", [py, "-c", "import json; from megagpt.doctor import matmul_probe; "
                                        "print(json.dumps(matmul_probe()))"], 30),
        ("attention T=4096 D=128 bf16", [py, "-m", "kernels.bench", "--kernel", "attention", "--dtype", "bf16",
                                         "--seq-len", "4096", "--head-dim", "128", "--out",
                                         str(out / "attention")], 60),
        ("layernorm C=768..8192 bf16", [py, "-m", "kernels.bench", "--kernel", "layernorm", "--dtype", "bf16",
                                        "--width", "768", "1024", "2048", "4096", "8192", "--out",
                                        str(out / "layernorm")], 45),
        ("gpt3_125m step time", [py, "-m", "megagpt", "train", str(ROOT / "configs/gpt3_125m.yaml"), "--run-dir",
                                 str(out / "gpt3_125m"), *_sets("data.dataset_dir={dataset}", "train.max_steps=6",
                                 "train.log_interval=1", "train.eval_interval=1000", "train.eval_steps=2",
                                 "train.checkpoint_interval=1000",
                                 "train.warmup_steps=1", "logging.progress_bar=false", "logging.tensorboard=false")],
         90),
        ("shakespeare_char to val loss", [py, "-m", "megagpt", "train", str(ROOT / "configs/shakespeare_char.yaml"),
                                          "--run-dir", str(out / "shakespeare_char"),
                                          *_sets("logging.progress_bar=false")], 0),  # 0: whatever budget is left
    ]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_full(out: Path, parts: list[tuple[str, list[str], int]] | None = None,
             budget_s: float = FULL_BUDGET_S) -> list[Result]:
    """Each part in turn within its own limit and what is left of the budget; a part the budget no longer
    allows is skipped with the command that runs it alone."""
    out.mkdir(parents=True, exist_ok=True)
    started, results, dataset = time.perf_counter(), [], None
    for name, cmd, allowed in full_parts(out) if parts is None else parts:
        left = budget_s - (time.perf_counter() - started)
        limit = min(allowed, left) if allowed else left
        if limit < 5:
            results.append(Result(name, "SKIP", f"the {budget_s:.0f} s budget is spent",
                                  "run it on its own: " + " ".join(cmd[1:])))
        else:
            if dataset is None and any("{dataset}" in c for c in cmd):
                dataset = prepare_dataset(Path(tempfile.mkdtemp(prefix="megagpt_doctor_")), kilobytes=4096)
            results.append(run_part(name, [c.format(dataset=dataset) for c in cmd], limit, out))
        print(format_line(results[-1]), flush=True)
    return results


def run_part(name: str, cmd: list[str], limit: float, out: Path) -> Result:
    """One part as a child process group, its output streamed to OUT/<first word>.log, so that a part stopped at
    its limit keeps what it printed, and takes its own children (pytest's workers) with it."""
    log = out / f"{name.split()[0]}.log"
    cold = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton_cold_")} if name.startswith("triton") else {}
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(**cold), cwd=ROOT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Result(name, "FAIL", f"still running after {limit:.0f} s (its limit)",
                          f"what it printed is in {log}", time.perf_counter() - started)
    seconds, text = time.perf_counter() - started, log.read_text()
    if code != 0:
        tail = (text.strip().splitlines() or [""])[-1][:160]
        return Result(name, "FAIL", f"exit {code}: {tail}", f"its log: {log}", seconds)
    try:
        numbers = part_numbers(name, out, text)
        return Result(name, "PASS", summarize_part(name, numbers, text), "", seconds, numbers)
    except Exception as e:  # noqa: BLE001  it exited 0 but left no numbers: say so, go on with the next part
        return Result(name, "FAIL", f"exit 0, but its results could not be read: {type(e).__name__}: {e}"[:240],
                      f"its log: {log}", seconds)


def part_numbers(name: str, out: Path, output: str) -> dict:
    """The numbers the issue's goals are about, read back from each part's own output files."""
    folder = out / name.split()[0]
    if name.startswith("attention"):
        rows = {r["impl"]: r for r in json.loads((folder / "results.json").read_text())["rows"]}
        ours = rows.pop("triton")
        return {"fwd_tflops": ours["fwd_rate"], "fwd_bwd_tflops": ours["fwd_bwd_rate"],
                "fwd_bwd_vs": {impl: ours["fwd_bwd_rate"] / r["fwd_bwd_rate"] for impl, r in rows.items()}}
    if name.startswith("layernorm"):
        by = {(r["impl"], r["C"]): r for r in json.loads((folder / "results.json").read_text())["rows"]}
        return {C: {"fwd_gbs": by["triton", C]["fwd_rate"],
                    "of_copy": by["triton", C]["fwd_rate"] / by["copy", C]["fwd_rate"],
                    "vs_torch": by["torch", C]["fwd_bwd_ms"] / by["triton", C]["fwd_bwd_ms"]}
                for C in sorted({C for impl, C in by if impl == "triton"})}
    if name.startswith(("triton", "bf16")):  # the probes print one JSON line last
        return next(json.loads(line) for line in reversed(output.splitlines()) if line.startswith("{"))
    if name.startswith(("gpt3_125m", "shakespeare")):
        metrics = read_metrics(folder)
        steps = [m for m in metrics if "loss" in m]
        numbers = {"steps": len(steps)}
        rates = [m["tokens_per_sec"] for m in steps[1:]]  # the first step compiles and autotunes
        mfu = [m["mfu"] for m in steps[1:] if m.get("mfu")]
        val = [m["val_loss"] for m in metrics if "val_loss" in m]
        numbers.update({"tokens_per_sec": statistics.median(rates)} if rates else {})  # median: not a lucky step
        numbers.update({"mfu": statistics.median(mfu)} if mfu else {})
        numbers.update({"val_loss": val[-1]} if val else {})
        return numbers
    return {}


def summarize_part(name: str, n: dict, output: str) -> str:
    """One line of a part's numbers (part_numbers), or its output's last line."""
    if name.startswith("attention"):
        ratios = ", ".join(f"{r:.2f}x {impl}" for impl, r in n["fwd_bwd_vs"].items())
        return (f"triton fwd {n['fwd_tflops']:g}, fwd+bwd {n['fwd_bwd_tflops']:g} TFLOP/s; fwd+bwd vs "
                f"{ratios or 'no SDPA backend'}")
    if name.startswith("layernorm"):
        return "; ".join(f"C={C}: fwd {r['fwd_gbs']:g} GB/s = {r['of_copy']:.0%} of copy, fwd+bwd "
                         f"{r['vs_torch']:.2f}x F.layer_norm" for C, r in n.items())
    if name.startswith("triton"):
        return "; ".join(f"{config}: first fwd+bwd {cold:.1f} s (autotune, cold cache), then {warm * 1e3:.1f} ms"
                         for config, (cold, warm) in n.items())
    if name.startswith("bf16"):
        return f"{n['tflops']:.0f} TFLOP/s on random {n['n']}x{n['n']}x{n['n']} products"
    if name.startswith(("gpt3_125m", "shakespeare")):
        parts = [f"{n['steps']} steps logged"]
        parts += [f"{n['tokens_per_sec']:,.0f} tokens/s (median)"] if "tokens_per_sec" in n else []
        parts += [f"MFU {n['mfu']:.2f} (median)"] if "mfu" in n else []
        parts += [f"val loss {n['val_loss']:.3f}"] if "val_loss" in n else []
        return ", ".join(parts)
    return (output.strip().splitlines() or [""])[-1][:200]


GOALS = [  # issue #14's goals on one H100/H200: (what, part, measure of the part's numbers, at least / at most)
    ("attention fwd+bwd vs SDPA's FlashAttention-2 backend", "attention",
     lambda n, full: n["fwd_bwd_vs"]["sdpa-flash"], ">=", 1.0),
    ("attention forward vs the measured bf16 matrix rate", "attention",
     lambda n, full: n["fwd_tflops"] / full["bf16"]["tflops"], ">", 0.5),
    ("LayerNorm forward vs copy bandwidth, worst C", "layernorm",
     lambda n, full: min(r["of_copy"] for r in n.values()), ">=", 0.8),
    ("LayerNorm fwd+bwd vs F.layer_norm, worst C", "layernorm",
     lambda n, full: min(r["vs_torch"] for r in n.values()), ">=", 1.5),
    ("gpt3_125m MFU", "gpt3_125m", lambda n, full: n["mfu"], ">=", 0.45),
    ("shakespeare_char val loss at its last step", "shakespeare_char", lambda n, full: n["val_loss"], "<=", 1.47),
]


def goal_lines(full: list[Result]) -> list[str]:
    """Each goal: its measured value and met / NOT met, or why it has no value (a part failed, was skipped, or
    did not measure it)."""
    numbers = {r.name.split()[0]: r.numbers for r in full if r.status == "PASS"}
    lines = []
    for what, part, measure, op, bound in GOALS:
        try:
            value = measure(numbers[part], numbers)
        except (KeyError, ValueError, ZeroDivisionError) as e:
            lines.append(f"{what} ({op} {bound:g}): no value ({type(e).__name__}: {e})")
            continue
        met = {">=": operator.ge, ">": operator.gt, "<=": operator.le}[op](value, bound)
        lines.append(f"{what} ({op} {bound:g}): {value:.3g}, {'met' if met else 'NOT met'}")
    return lines


def write_report(out: Path, checks: list[Result], full: list[Result], budget_s: float) -> Path:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"# megagpt doctor --full, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Device: {device}. {checks[0].detail}.", "", "| check | result | seconds | detail |",
             "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail} |" for r in checks + full]
    lines += ["", f"--full parts took {sum(r.seconds for r in full):.0f} s of a {budget_s:.0f} s budget.", "",
              "Issue #14's goals:", ""] + [f"- {line}" for line in goal_lines(full)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, checks: list[Callable] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt doctor", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--full", action="store_true", help="GPU only: tests, benchmarks, training probes (8 min)")
    p.add_argument("--out", type=Path, default=Path("doctor_out"), help="--full's report and logs")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="end --full within this many seconds of doctor's start (a lease's or a job's limit): "
                        "its budget shrinks by what the checks before it took")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    print(f"{'check':<18} {'':<4} {'time':>8}  detail", flush=True)
    results = run_checks(CHECKS if checks is None else checks)
    full: list[Result] = []
    if args.full:
        if importlib.util.find_spec("torch") is not None and _has_cuda():
            budget = FULL_BUDGET_S
            if args.time_limit is not None:
                budget = min(budget, args.time_limit - (time.perf_counter() - started))
            full = run_full(args.out, budget_s=budget)
            print("\n".join(["goals:"] + [f"  {line}" for line in goal_lines(full)]))
            print(f"report: {write_report(args.out, results, full, budget)}")
        else:
            names = ", ".join(name for name, _, _ in full_parts(args.out))
            print(f"--full needs a CUDA GPU; on one it would also run: {names} (8 minutes in all)")
    failed = [r for r in results + full if r.status == "FAIL"]
    skipped = [r.name for r in results + full if r.status == "SKIP"]
    summary = f"{len(results + full) - len(failed) - len(skipped)} passed, {len(failed)} failed"
    print(summary + (f", skipped: {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
