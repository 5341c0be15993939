"""The basic checks of `megagpt doctor`, one line each: versions and missing packages, devices and their known
peaks, native bf16, a collective across local devices (gloo on CPU, NCCL on GPUs), each Triton kernel against
kernels.reference on this device, and 20 steps of a tiny training through DeepSpeed; each failure says what to
do. Also the helpers --full's parts share: the result line, a child's environment, a synthetic dataset.
Imports only the standard library at the top, so it also runs where megagpt's own dependencies are missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import socket
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


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child_env(**extra: str) -> dict:
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
    on_gpu = has_cuda()
    env = child_env() if on_gpu else child_env(TRITON_INTERPRET="1")
    code = "import json; from megagpt.doctor_checks import kernel_probe; print(json.dumps(kernel_probe()))"
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
                          env=child_env(), timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RuntimeError(f"data_prep.prepare failed: {tail}")
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


TINY_STEPS = 20


def set_args(*items: str) -> list[str]:
    """`megagpt train`'s `--set` arguments for each `key=value`."""
    return [arg for item in items for arg in ("--set", item)]


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
        cmd = [sys.executable, "-m", "megagpt", "train", str(config), "--run-dir", str(run_dir), *set_args(*sets)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=600)
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
