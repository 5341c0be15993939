"""`megagpt doctor --full` (a GPU): the parts beyond the basic checks, each a child process timed within one
budget; the numbers read back from each part's own output, issue #14's goals judged on them, the Markdown report.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megagpt.doctor_checks import (
    ROOT,
    Result,
    child_env,
    format_line,
    has_cuda,
    prepare_dataset,
    read_metrics,
    set_args,
)
from megagpt.errors import UserError, refuse_file_in_the_way

FULL_BUDGET_S = 8 * 60
MARK = ".megagpt-doctor"  # in --out: doctor made this folder, so its parts' own folders are its to replace


def run(out: Path, checks: list[Result], seconds_left: float | None) -> list[Result]:
    """--full after the basic checks: on a CUDA GPU every part within FULL_BUDGET_S (or the seconds left, if
    fewer), the goals printed and the report written; elsewhere one line saying what it would run."""
    if importlib.util.find_spec("torch") is None or not has_cuda():
        names = ", ".join(name for name, _, _ in full_parts(out))
        print(f"--full needs a CUDA GPU; on one it would also run: {names} (8 minutes in all)")
        return []
    budget = FULL_BUDGET_S if seconds_left is None else min(FULL_BUDGET_S, seconds_left)
    full = run_full(out, budget_s=budget)
    print("\n".join(["goals:"] + [f"  {line}" for line in goal_lines(full)]))
    print(f"report: {write_report(out, checks, full, budget)}")
    return full


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
    probe = "import json; from megagpt.doctor_full import first_step_probe; print(json.dumps(first_step_probe()))"
    pytest = [py, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")]
    if importlib.util.find_spec("xdist") is not None:  # compiling 153 kernel configs dominates: 4 at a time
        pytest += ["-n", "4"]
    return [
        ("pytest -m gpu", pytest, 150),
        ("triton cold first step", [py, "-c", probe], 90),
        ("bf16 matmul rate", [py, "-c", "import json; from megagpt.doctor_full import matmul_probe; "
                                        "print(json.dumps(matmul_probe()))"], 30),
        ("attention T=4096 D=128 bf16", [py, "-m", "kernels.bench", "--kernel", "attention", "--dtype", "bf16",
                                         "--seq-len", "4096", "--head-dim", "128", "--out",
                                         str(out / "attention")], 60),
        ("layernorm C=768..8192 bf16", [py, "-m", "kernels.bench", "--kernel", "layernorm", "--dtype", "bf16",
                                        "--width", "768", "1024", "2048", "4096", "8192", "--out",
                                        str(out / "layernorm")], 45),
        ("gpt3_125m step time", [py, "-m", "megagpt", "train", str(ROOT / "configs/gpt3_125m.yaml"), "--run-dir",
                                 str(out / "gpt3_125m"), *set_args("data.dataset_dir={dataset}", "train.max_steps=6",
                                 "train.log_interval=1", "train.eval_interval=1000", "train.eval_steps=2",
                                 "train.checkpoint_interval=1000",
                                 "train.warmup_steps=1", "logging.progress_bar=false", "logging.tensorboard=false")],
         90),
        ("shakespeare_char to val loss", [py, "-m", "megagpt", "train", str(ROOT / "configs/shakespeare_char.yaml"),
                                          "--run-dir", str(out / "shakespeare_char"),
                                          *set_args("logging.progress_bar=false")], 0),  # 0: whatever budget is left
    ]


def check_out(out: Path) -> None:
    """--out may take --full's parts: new, empty, or an earlier doctor's (its mark). Another folder is refused:
    its `shakespeare_char` may be a real run that the part would resume, and one part's old results would pass
    for new ones."""
    refuse_file_in_the_way(out, f"--out {out}", "pick another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise UserError(f"--out {out}: is a folder that doctor did not make (no {MARK}); give a new or empty one")


def run_full(out: Path, parts: list[tuple[str, list[str], int]] | None = None,
             budget_s: float = FULL_BUDGET_S) -> list[Result]:
    """Each part in turn within its own limit and what is left of the budget; a part the budget no longer
    allows is skipped with the command that runs it alone."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("made by megagpt doctor --full: each run replaces its parts' folders and logs\n")
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
    log, folder = out / f"{name.split()[0]}.log", out / name.split()[0]
    shutil.rmtree(folder, ignore_errors=True)  # an earlier doctor's: a training part would resume it
    cold = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton_cold_")} if name.startswith("triton") else {}
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(**cold), cwd=ROOT,
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
