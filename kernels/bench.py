"""Kernel benchmark: Triton causal attention vs torch SDPA backends, Triton LayerNorm vs F.layer_norm.

`python -m kernels.bench` or `megagpt bench kernels [--kernel attention|layernorm|all] [--quick] [--dtype D]
[--seq-len T ...] [--head-dim D ...] [--width C ...] [--out DIR]`. Prints a table and writes table.txt,
results.csv, results.json and one PNG per kernel to --out. LayerNorm rows include `copy`: a plain device copy of
the same rows, the bandwidth a memory-bound kernel can at best reach.
Without a GPU everything runs under Triton's interpreter at toy sizes: those timings check the plumbing, they
say nothing about performance.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels.limits import head_dim_problem, width_problem

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["kernel", "impl", "dtype", "B", "H", "T", "D", "rows", "C", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
           "fwd_rate", "bwd_rate", "fwd_bwd_rate", "rate_unit"]


def _sizes(on_gpu: bool, quick: bool, chosen: dict | None = None) -> dict:
    """Problem sizes: real ones on a GPU (B*T = 16k tokens, H*D = 2048), toys under the interpreter; `chosen`
    replaces any of T, D, C."""
    if on_gpu:
        sizes = {"T": [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384], "D": [64, 128],
                 "C": [768, 4096, 16384] if quick else [768, 1024, 2048, 4096, 8192, 16384], "rows": 8192}
    else:
        sizes = {"T": [16, 32], "D": [16] if quick else [16, 32], "C": [64, 128], "rows": 16}
    return {**sizes, **{k: v for k, v in (chosen or {}).items() if v}}


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def _time_ms(fn, on_gpu: bool, quick: bool, grad_to_none=None) -> float:
    """Milliseconds per call: triton's do_bench on a GPU, a median of perf_counter loops on the CPU."""
    fn()  # compile, autotune, warm caches: never timed
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                       grad_to_none=grad_to_none)
    times = []
    for _ in range(1 if quick else 3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _time_passes(forward, inputs: list[torch.Tensor], on_gpu: bool, quick: bool) -> list[float]:
    """[forward, backward, forward+backward] milliseconds of `forward(*inputs)`, random output gradient."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = forward(*leaves)
    dout = torch.randn_like(out)
    fwd = _time_ms(lambda: forward(*leaves), on_gpu, quick)
    bwd = _time_ms(lambda: out.backward(dout, retain_graph=True), on_gpu, quick, grad_to_none=leaves)
    both = _time_ms(lambda: forward(*leaves).backward(dout), on_gpu, quick, grad_to_none=leaves)
    return [fwd, bwd, both]


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------
def _sdpa_impls() -> dict:
    """Each SDPA backend this torch knows, pinned with sdpa_kernel (availability is checked per shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    for name, attr in [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                       ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")]:
        backend = getattr(SDPBackend, attr, None)
        if backend is not None:
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            impls[f"sdpa-{name}"] = sdpa
    return impls


def bench_attention(dtype: torch.dtype, device: str, on_gpu: bool, quick: bool, chosen: dict | None = None
                    ) -> list[dict]:
    sizes = _sizes(on_gpu, quick, chosen)
    impls = {"triton": kernels.causal_attention, **_sdpa_impls()}
    rows, skipped = [], set()
    for D in sizes["D"]:
        for T in sizes["T"]:
            B, H = (max(1, 16384 // T), 2048 // D) if on_gpu else (1, 2)
            qkv = _inputs(f"--seq-len {T} --head-dim {D}", [(B, H, T, D)] * 3, device, dtype)
            fwd_flops = 4 * B * H * T * T * D / 2  # two matmuls of 2*T*T*D flops, half under the diagonal
            for name, fn in impls.items():
                try:
                    ms = _time_passes(fn, qkv, on_gpu, quick)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # backend unavailable for this case
                    if name not in skipped:
                        print(f"  skipping {name} where unavailable (first: T={T} D={D}: {_reason(e)})",
                              file=sys.stderr)
                    skipped.add(name)
                    continue
                rates = [f / (t * 1e-3) / 1e12 for f, t in zip([fwd_flops, 2.5 * fwd_flops, 3.5 * fwd_flops],
                                                                ms, strict=True)]
                rows.append(_row("attention", name, dtype, ms, rates, "TFLOP/s", B=B, H=H, T=T, D=D))
            if on_gpu:
                torch.cuda.empty_cache()
    return rows


class TooLarge(Exception):
    """A size whose inputs cannot be allocated on the device: the flag that asked for it, and why."""


def _inputs(flags: str, shapes: list[tuple], device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random tensors of these shapes; TooLarge naming `flags` when they do not fit in the device's memory."""
    try:
        return [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU, an allocator's RuntimeError on the CPU
        raise TooLarge(f"{flags}: the inputs {shapes[0]} do not fit in {device} memory ({_reason(e)})") from None


def _reason(error: Exception, limit: int = 200) -> str:
    """The error's first line, whole; a longer one cut after its last sentence that ends within `limit`."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    end = line.rfind(". ", 0, limit)
    return line if len(line) <= limit or end < 0 else line[:end + 1]


# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------
def bench_layer_norm(dtype: torch.dtype, device: str, on_gpu: bool, quick: bool, chosen: dict | None = None
                     ) -> list[dict]:
    sizes = _sizes(on_gpu, quick, chosen)
    N = sizes["rows"]
    impls = {"triton": kernels.layer_norm, "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)}
    rows = []
    for C in sizes["C"]:
        inputs = _inputs(f"--width {C}", [(N, C), (C,), (C,)], device, dtype)
        nbytes = N * C * inputs[0].element_size()  # one pass over the activations
        for name, fn in impls.items():
            ms = _time_passes(fn, inputs, on_gpu, quick)
            # forward reads x, writes y; backward reads x and dy, writes dx (weight, stats: negligible)
            moved = [2 * nbytes, 3 * nbytes, 5 * nbytes]
            rates = [b / (t * 1e-3) / 1e9 for b, t in zip(moved, ms, strict=True)]
            rows.append(_row("layernorm", name, dtype, ms, rates, "GB/s", rows=N, C=C))
        rows.append(_copy_row(inputs[0], dtype, on_gpu, quick))
    return rows


def _copy_row(x: torch.Tensor, dtype: torch.dtype, on_gpu: bool, quick: bool) -> dict:
    """A device copy of x's rows: read + write, as LayerNorm's forward. Its GB/s is the ceiling each pass can
    reach; its ms are that ceiling's times for the forward's 2, backward's 3 and both passes' 5 passes over x."""
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), on_gpu, quick)
    rate = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
    return _row("layernorm", "copy", dtype, [ms, 1.5 * ms, 2.5 * ms], [rate] * 3, "GB/s", rows=x.shape[0],
                C=x.shape[1])


def _row(kernel: str, impl: str, dtype: torch.dtype, ms, rates, unit: str, **shape) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(kernel=kernel, impl=impl, dtype=str(dtype).removeprefix("torch."), rate_unit=unit, **shape)
    row.update(zip(["fwd_ms", "bwd_ms", "fwd_bwd_ms"], [float(f"{t:.4g}") for t in ms], strict=True))
    row.update(zip(["fwd_rate", "bwd_rate", "fwd_bwd_rate"], [float(f"{r:.4g}") for r in rates], strict=True))
    return row


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    shown = ["kernel", "impl", "B", "H", "T", "D", "rows", "C", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_rate",
             "bwd_rate", "fwd_bwd_rate", "rate_unit"]
    cells = [shown] + [[str(r[c]) for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in cells)


def write_outputs(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    texts = {"table.txt": meta["note"] + "\n\n" + format_table(rows) + "\n", "results.csv": table.getvalue(),
             "results.json": json.dumps({**meta, "rows": rows}, indent=2) + "\n"}
    written = [replace_text(out / name, text) for name, text in texts.items()]
    return written + _plots(rows, meta, out)


def replace_text(path: Path, text: str) -> Path:
    """path holds text whole or keeps what it held: written beside it, then renamed over it (Ctrl-C, a full
    disk). kernels/' own (it imports only torch and triton): megagpt's is megagpt.files.write_whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plots(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """One PNG per kernel: rate against size, one line per implementation (and head dim), per pass."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plots (pip install matplotlib)")
        return []
    paths = []
    for kernel, x_key in [("attention", "T"), ("layernorm", "C")]:
        kernel_rows = [r for r in rows if r["kernel"] == kernel]
        if not kernel_rows:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (col, title) in zip(axes, [("fwd_rate", "forward"), ("bwd_rate", "backward"),
                                           ("fwd_bwd_rate", "forward + backward")], strict=True):
            for label in sorted({_series(r) for r in kernel_rows}):
                series = sorted((r[x_key], r[col]) for r in kernel_rows if _series(r) == label)
                ax.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set(title=title, xlabel=x_key, ylabel=kernel_rows[0]["rate_unit"])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{kernel}, {meta['dtype']}, {meta['device']}"
                     + (": interpreter timings, not performance" if meta["interpreter"] else ""))
        fig.tight_layout()
        path = out / f"{kernel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _series(row: dict) -> str:
    return f"{row['impl']} D={row['D']}" if row["kernel"] == "attention" else row["impl"]


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=["attention", "layernorm", "all"], default="all")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on a GPU, fp32 under the interpreter (which has no real bf16)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--seq-len", type=int, nargs="+", help="attention sequence lengths T (default: a sweep)")
    p.add_argument("--head-dim", type=int, nargs="+", help="attention head dims D (default: 64 and 128)")
    p.add_argument("--width", type=int, nargs="+", help="LayerNorm row lengths C (default: a sweep)")
    p.add_argument("--out", type=Path, default=Path("bench_out/kernels"), help="output directory")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each size flag's values refused before any work, a size flag of the kernel --kernel leaves out refused
    (it would be ignored), and --out made."""
    checks = [("--seq-len", args.seq_len, lambda T: None if T >= 1 else "must be at least 1"),
              ("--head-dim", args.head_dim, head_dim_problem), ("--width", args.width, width_problem)]
    sized = {"--seq-len": "attention", "--head-dim": "attention", "--width": "layernorm"}
    for flag, values, problem in checks:
        if values and args.kernel not in ("all", sized[flag]):
            p.error(f"{flag} sizes {sized[flag]}, which --kernel {args.kernel} leaves out; drop it or pass "
                    f"--kernel {sized[flag]} or all")
        for value in values or []:
            if (why := problem(value)) is not None:
                p.error(f"{flag} {value}: {why}")
    make_out(p, args.out)


def make_out(p: argparse.ArgumentParser, out: Path) -> None:
    """--out made before the work (also kernels.compile_check's): a file in the way is refused now, not after."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        in_the_way = isinstance(e, (FileExistsError, NotADirectoryError))
        p.error(f"--out {out}: cannot make this folder ({'a file is in the way' if in_the_way else e.strerror})")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    on_gpu = torch.cuda.is_available()
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    if not on_gpu and dtype_name == "bf16":
        print("megagpt bench kernels: error: --dtype bf16 needs a GPU (the Triton interpreter has no real "
              "bf16); use fp32 or fp16", file=sys.stderr)
        return 2
    device = "cuda" if on_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)"
    note = (f"Kernel benchmark on {device_name}, {dtype_name}." if on_gpu else
            "INTERPRETER TIMINGS, NOT PERFORMANCE: no GPU, so the Triton kernels run one program at a time "
            "in numpy under TRITON_INTERPRET=1 at toy sizes; they check the plumbing only. What the kernels "
            "cost on an H100 in registers and shared memory: python -m kernels.compile_check --quick")
    print(note)
    dtype = DTYPES[dtype_name]
    rows, chosen = [], {"T": args.seq_len, "D": args.head_dim, "C": args.width}
    try:
        if args.kernel in ("attention", "all"):
            rows += bench_attention(dtype, device, on_gpu, args.quick, chosen)
        if args.kernel in ("layernorm", "all"):
            rows += bench_layer_norm(dtype, device, on_gpu, args.quick, chosen)
    except TooLarge as e:
        print(f"megagpt bench kernels: error: {e}; pick a smaller size", file=sys.stderr)
        return 2
    print(format_table(rows))
    meta = {"note": note, "device": device_name, "interpreter": not on_gpu, "dtype": dtype_name,
            "torch": torch.__version__, "triton": _triton_version(),
            "flops": "attention: 4*B*H*T^2*D/2 forward (causal), backward 2.5x forward",
            "bytes": "layernorm: forward 2*N*C*elem (read x, write y), backward 3*N*C*elem (x, dy, dx)"}
    for path in write_outputs(rows, meta, args.out):
        print(f"wrote {path}")
    return 0 if all(math.isfinite(r["fwd_bwd_ms"]) for r in rows) else 1


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
