"""Compile every kernel for a GPU architecture on a machine without one: what the interpreter cannot show.

The interpreter runs the kernels' maths in numpy and never lowers them, so a dot Hopper's MMA rejects, a tile that
overflows shared memory or a config that spills registers only shows once compiled. Triton's compiler and the
ptxas it ships need no GPU: this compiles each kernel x dtype x head dim (or row length) x autotune config to a
cubin for the target (default sm_90, the H100), with the arguments the launchers pass, and reports shared memory,
registers, spills and whether the dots became Hopper's wgmma.

    python -m kernels.compile_check [--arch 90] [--quick] [--tuning pruned|full] [--jobs N] [--out DIR]
    python -m kernels.compile_check --first-step T=256,D=64,C=384,dropout=0.2,dtype=bf16 [--tuning full]

--first-step compiles exactly the configs a cold first training step autotunes over (attention forward and
backward at one (T, D, dropout); LayerNorm forward and backward at one C) and prints their summed compile time.

Exit status 1 when some (kernel, dtype, size) has no config that compiles and fits: on a GPU the autotuner would
have nothing to run. Spilling configs are only reported; the autotuner times them like any other.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kernels.bench import make_out, replace_text
from kernels.limits import head_dim_problem, width_problem

# Largest shared memory one block may opt into, per compute capability (CUDA programming guide, table 21).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ATTENTION_KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_delta")
LN_KERNELS = ("ln_fwd", "ln_bwd", "ln_column_sum")
# The launch arguments are meta tensors: shapes, strides and dtypes without memory (8192 x 65536 rows would be
# 2 GiB each); their data_ptr() is 0, which triton specialises as 16-byte aligned, as real allocations are.
META = "meta"
COLUMNS = ["kernel", "dtype", "size", "dropout", "bias", "config", "status", "shared", "registers", "spill_bytes",
           "wgmma", "seconds", "error"]


@dataclass(frozen=True)
class Case:
    """One compile: a kernel, the problem it is specialised for, and the index of its autotune config."""
    kernel: str
    dtype: str  # fp16 | bf16 | fp32
    size: int  # head dim D for attention, row length C for LayerNorm
    dropout: bool = False  # attention: compiled with dropout on
    config: int = 0
    bias: bool = False  # LayerNorm: with a bias (the model's default, bias: false, has only a weight)
    tuning: str = "pruned"  # whose autotune configs: the default pruned search, or the full one
    seq_len: int = 4096  # attention's T (a runtime argument: only its divisibility by 16 changes the compile)

    @property
    def group(self) -> tuple:
        """What the autotuner would choose a config for: everything but the config."""
        return self.kernel, self.dtype, self.size, self.variant

    @property
    def variant(self) -> str:
        if self.kernel in ATTENTION_KERNELS:
            return "dropout" if self.dropout else "-"
        return "bias" if self.bias else "no bias"


@dataclass
class Result:
    case: Case
    config: str = ""
    status: str = "ok"  # ok | spills | too-much-shared | error
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    wgmma: bool = False
    seconds: float = 0.0
    error: str = ""

    def row(self) -> dict:
        """The case's fields, its config index replaced by the config's description, then the findings."""
        return {**asdict(self.case), **{k: v for k, v in asdict(self).items() if k != "case"}}


# ----------------------------------------------------------------------------------------------------
# What to compile (the worker side: kernels imported compiled, never interpreted)
# ----------------------------------------------------------------------------------------------------
def _attention_launch(kernel: str, dtype, D: int, dropout: bool, tuning: str, T: int = 4096, H: int = 2):
    """(kernel, args, constexprs) as the launchers build them, for q, k, v split from a fused qkv projection
    (the model's layout, strides (T*3C, D, 3C, 1)) and an output grad from a transposed view."""
    import torch

    from kernels import attention

    p = 0.1 if dropout else 0.0
    qkv = torch.empty(1, T, 3, H, D, dtype=dtype, device=META)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = torch.empty(1, T, H, D, dtype=dtype, device=META).transpose(1, 2)
    o, dq, dk, dv = (torch.empty(1, H, T, D, dtype=dtype, device=META) for _ in range(4))
    lse, delta = (torch.empty(1, H, T, dtype=torch.float32, device=META) for _ in range(2))
    meta = attention.kernel_meta(q, p)
    tuned = attention.TUNED[tuning]
    if kernel == "attn_fwd":
        return tuned["fwd"], attention.forward_args(q, k, v, o, lse, 0.125, p, 1234), meta
    dkdv, dq_args = attention.backward_args(q, k, v, do, lse, delta, dq, dk, dv, 0.125, p, 1234)
    if kernel == "attn_bwd_dkdv":
        return tuned["dkdv"], dkdv, meta
    if kernel == "attn_bwd_dq":
        return tuned["dq"], dq_args, meta
    return attention._bwd_delta_kernel, attention.delta_args(o, do, delta), dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"],
                                                   BLOCK_M=attention.DELTA_BLOCK["gpu"])


def _layer_norm_launch(kernel: str, dtype, C: int, bias: bool, tuning: str, rows: int = 8192, groups: int = 264):
    import importlib

    import torch

    ln = importlib.import_module("kernels.layer_norm")  # `kernels.layer_norm` the attribute is the function

    x = torch.empty(rows, C, dtype=dtype, device=META)
    w, b = torch.empty(C, dtype=dtype, device=META), (torch.empty(C, dtype=dtype, device=META) if bias else None)
    stats = [torch.empty(rows, dtype=torch.float32, device=META) for _ in range(2)]
    parts = [torch.empty(groups, C, dtype=torch.float32, device=META) for _ in range(2)]
    if kernel == "ln_fwd":
        return (ln.TUNED[tuning]["fwd"], ln.forward_args(x, torch.empty_like(x), w, b, *stats, 1e-5),
                ln.row_meta(C, w, b))
    if kernel == "ln_bwd":
        args = ln.backward_args(x, torch.empty_like(x), torch.empty_like(x), w, *stats, *parts, rows // groups)
        return ln.TUNED[tuning]["bwd"], args, ln.row_meta(C, w, b)
    block_g, block_c = ln.COLUMN_SUM_TILE["gpu"]
    return ln._column_sum_kernel, (parts[0], w, groups, C), dict(BLOCK_G=block_g, BLOCK_C=block_c)


def _launch(case: Case):
    """(jit function, list of triton.Config, args, constexprs) of a case."""
    import torch
    import triton

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    if case.kernel in ATTENTION_KERNELS:
        fn, args, meta = _attention_launch(case.kernel, dtype, case.size, case.dropout, case.tuning, case.seq_len)
    else:
        fn, args, meta = _layer_norm_launch(case.kernel, dtype, case.size, case.bias, case.tuning)
    if hasattr(fn, "configs"):  # autotuned: the configs its search tries for this key, after its own pruning
        configs = fn.configs
        if fn.early_config_prune is not None:
            configs = fn.early_config_prune(configs, dict(zip(fn.arg_names, args, strict=False)), **meta)
        return fn.fn, configs, args, meta
    return fn, [triton.Config({}, num_warps=4, num_stages=3)], args, meta  # triton's launch defaults


def config_count(case: Case) -> int:
    return len(_launch(case)[1])


def compile_case(case: Case, arch: int) -> Result:
    """Compile one case exactly as JITFunction.run would before launching it, for `arch`, and measure it.
    `seconds` is the compile alone (what an autotuner's first call pays), not the ptxas -v re-run."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, configs, args, meta = _launch(case)
    config = configs[case.config]
    result = Result(case, config=_describe(config))
    started = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        # FOOTGUN: mirrors JITFunction.run (triton 3.9) up to the launch, private helpers included, so that the
        # signature, the specialisations (strides of 1, 16-byte alignment) and the options are the launch's own.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = {**meta, **config.all_kwargs()}
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        compiled = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as error:  # noqa: BLE001  every failure is a finding, reported per case
        result.status, result.error = "error", _first_line(error)
        result.seconds = time.perf_counter() - started
        return result
    result.seconds = time.perf_counter() - started
    ptx = compiled.asm["ptx"]
    result.shared = int(compiled.metadata.shared)
    result.registers, result.spill_bytes = _ptxas_usage(ptx, arch)
    result.wgmma = "wgmma.mma_async" in ptx
    if result.shared > SHARED_LIMIT[arch]:
        result.status = "too-much-shared"
    elif result.spill_bytes:
        result.status = "spills"
    return result


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """Registers per thread and spill-store bytes, from the same ptxas triton used, run again with -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(registers.group(1)) if registers else 0, int(spills.group(1)) if spills else 0


def _describe(config) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles + ' ' if tiles else ''}w{config.num_warps} s{config.num_stages}"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


# ----------------------------------------------------------------------------------------------------
# The matrix, the pool, the report (the parent side: imports no kernels)
# ----------------------------------------------------------------------------------------------------
def problems(quick: bool, dtypes: list[str], tuning: str = "pruned") -> list[Case]:
    """Config index 0 of every (kernel, dtype, size, variant) to check; expanded to every config later."""
    head_dims = [64, 128] if quick else [16, 32, 48, 64, 80, 96, 128]
    rows = [768, 16384] if quick else [768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 65536]
    cases = []
    for dtype in dtypes:
        for D in head_dims:
            for dropout in (False, True):
                cases += [Case(k, dtype, D, dropout, tuning=tuning) for k in ATTENTION_KERNELS if dropout is False
                          or k != "attn_bwd_delta"]
        cases += [Case(k, dtype, C, bias=bias, tuning=tuning) for C in rows for bias in (False, True)
                  for k in LN_KERNELS if k != "ln_column_sum" or (C == rows[0] and not bias)]
    return cases


@dataclass(frozen=True)
class FirstStep:
    """The shapes one training step hands the kernels: attention (T, D, dropout), LayerNorm C, one dtype."""
    T: int
    D: int
    C: int
    dtype: str = "bf16"
    dropout: float = 0.0
    bias: bool = False

    def cases(self, tuning: str) -> list[Case]:
        """Config 0 of every kernel the step launches (each autotuned one expands to its search)."""
        drop = self.dropout > 0
        attention = [Case(k, self.dtype, self.D, drop and k != "attn_bwd_delta", tuning=tuning, seq_len=self.T)
                     for k in ATTENTION_KERNELS]
        return attention + [Case(k, self.dtype, self.C, bias=self.bias, tuning=tuning) for k in LN_KERNELS]


FIRST_STEP_ITEMS = "T=..,D=..,C=..[,dropout=..][,dtype=bf16|fp16|fp32][,bias=0|1]"
BIAS_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_first_step(spec: str) -> FirstStep:
    """`T=256,D=64,C=384,dropout=0.2,dtype=bf16[,bias=1]` -> FirstStep (T, D, C required), each value one the
    kernels take (an argparse error naming the item otherwise)."""
    fields: dict = {}
    for item in spec.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        why = _first_step_problem(name, value)
        if why is not None:
            raise argparse.ArgumentTypeError(f"bad item {item!r}: {why} ({FIRST_STEP_ITEMS})")
        fields[name] = {"T": int, "D": int, "C": int, "dropout": float, "bias": BIAS_VALUES.get,
                        "dtype": str}[name](value.lower() if name == "bias" else value)
    if not {"T", "D", "C"} <= fields.keys():
        raise argparse.ArgumentTypeError(f"{spec!r}: T, D and C are required ({FIRST_STEP_ITEMS})")
    return FirstStep(**fields)


def _first_step_problem(name: str, value: str) -> str | None:
    """Why `name=value` is no item of --first-step (None: it is one)."""
    if name not in ("T", "D", "C", "dropout", "bias", "dtype"):
        return "unknown name"
    if name == "bias":
        return None if value.lower() in BIAS_VALUES else "bias is 0 or 1"
    if name == "dtype":
        return None if value in ("bf16", "fp16", "fp32") else "unknown dtype"
    try:
        number = float(value) if name == "dropout" else int(value)
    except ValueError:
        return "not a number" if name == "dropout" else "not an integer"
    if name == "dropout":
        return None if 0 <= number < 1 else "dropout is in [0, 1)"
    return {"T": None if number >= 1 else "T is at least 1", "D": head_dim_problem(number),
            "C": width_problem(number)}[name]


def first_step_report(step: FirstStep, tuning: str, results: list[Result]) -> str:
    """Per kernel: configs and summed compile seconds, then the total a cold first step compiles."""
    lines = [f"first step of T={step.T}, D={step.D}, C={step.C}, dropout={step.dropout:g}, {step.dtype}, "
             f"{'with' if step.bias else 'no'} LayerNorm bias, tuning {tuning}",
             f"{'kernel':<15}{'configs':>8}{'compile s':>11}{'fits':>6}"]
    for kernel in ATTENTION_KERNELS + LN_KERNELS:
        rs = [r for r in results if r.case.kernel == kernel]
        fits = sum(r.status in ("ok", "spills") for r in rs)
        lines.append(f"{kernel:<15}{len(rs):>8}{sum(r.seconds for r in rs):>11.1f}{fits:>6}")
    total = sum(r.seconds for r in results)
    lines.append(f"total: {len(results)} configs, {total:.1f} s of compiling (one after another, as the "
                 f"autotuner does), plus about {0.125 * len(results):.0f} s of benchmarking them (do_bench: "
                 f"25 ms warm-up + 100 ms each)")
    return "\n".join(lines)


def _expand(case: Case, one_config: bool = False) -> list[Case]:
    """The case itself (its own config) with one_config, else one case per autotune config."""
    if one_config:
        return [case]
    return [replace(case, config=i) for i in range(config_count(case))]


def run(cases: list[Case], arch: int, jobs: int, one_config: bool = False, progress: bool = True) -> list[Result]:
    """Compile every config (or the first) of every case in `jobs` fresh processes, where the kernels are
    really compiled: the caller's own kernels may be the interpreter's."""
    previous = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_ALWAYS_COMPILE")}
    os.environ["TRITON_INTERPRET"] = "0"  # spawned workers inherit it before they import kernels
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # cold compiles every time: the cache would hide their cost
    try:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_ignore_ctrl_c) as pool:
            try:
                expanded = [c for batch in pool.map(_expand, cases, [one_config] * len(cases)) for c in batch]
                results = _collect(pool, expanded, arch, progress)
            except KeyboardInterrupt:  # the compiles not started are dropped: only those running are waited for
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    order = {c: i for i, c in enumerate(expanded)}
    return sorted(results, key=lambda r: order[r.case])


def _collect(pool: futures.ProcessPoolExecutor, cases: list[Case], arch: int, progress: bool) -> list[Result]:
    """Every case compiled in the pool, in the order they finish; a counter on stderr (not tqdm: kernels/ imports
    only torch and triton)."""
    pending = [pool.submit(compile_case, c, arch) for c in cases]
    results = []
    for future in futures.as_completed(pending):
        results.append(future.result())
        if progress:
            end = "\n" if len(results) == len(pending) else ""
            print(f"\rcompiled {len(results)}/{len(pending)} for sm_{arch}", end=end, file=sys.stderr, flush=True)
    return results


def _ignore_ctrl_c() -> None:
    """A worker leaves Ctrl-C to the parent, which stops the pool (a worker's KeyboardInterrupt would only fail
    its one compile, and the pool would go on with the rest)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def unrunnable(results: list[Result]) -> list[tuple]:
    """(kernel, dtype, size, variant) groups where no config compiles within the shared memory limit."""
    groups: dict[tuple, bool] = {}
    for r in results:
        groups[r.case.group] = groups.get(r.case.group, False) or r.status in ("ok", "spills")
    return [key for key, runnable in groups.items() if not runnable]


def summary(results: list[Result]) -> str:
    """One line per (kernel, dtype, size, variant): configs that run clean / spill / do not fit / fail."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case.group, []).append(r)
    header = (f"{'kernel':<15}{'dtype':<6}{'size':>6} {'variant':<8}{'clean':>6}{'spill':>6}{'shmem':>6}{'error':>6}"
              f"  {'wgmma':<6}best clean config (fewest registers)")
    lines = [header, "-" * len(header)]
    for (kernel, dtype, size, variant), rs in groups.items():
        count = {s: sum(r.status == s for r in rs) for s in ("ok", "spills", "too-much-shared", "error")}
        clean = [r for r in rs if r.status == "ok"]
        best = min(clean, key=lambda r: r.registers) if clean else None
        best_text = f"{best.config} ({best.registers} regs, {best.shared // 1024} KiB)" if best else "-"
        lines.append(f"{kernel:<15}{dtype:<6}{size:>6} {variant:<8}{count['ok']:>6}"
                     f"{count['spills']:>6}{count['too-much-shared']:>6}{count['error']:>6}  "
                     f"{'yes' if any(r.wgmma for r in rs) else 'no':<6}{best_text}")
    errors = sorted({r.error for r in results if r.error})
    lines += [f"error: {e}" for e in errors]
    return "\n".join(lines)


def write(results: list[Result], out: Path, arch: int) -> None:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS + ["size_kind"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**row, "size_kind": "D" if row["kernel"].startswith("attn") else "C"} for row in rows)
    replace_text(out / "compile_check.csv", table.getvalue())  # each file whole (a Ctrl-C, a full disk)
    replace_text(out / "compile_check.json", json.dumps(
        {"arch": arch, "triton": triton.__version__, "ptxas": get_ptxas(arch).version,
         "shared_limit": SHARED_LIMIT[arch], "results": rows},
        indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="compute capability x10 (90 = H100, 80 = A100)")
    parser.add_argument("--quick", action="store_true", help="D in {64, 128}, C in {768, 16384} only")
    parser.add_argument("--one-config", action="store_true",
                        help="only each kernel's first autotune config: a quick sweep for compile errors")
    parser.add_argument("--dtype", nargs="+", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: all three (with --first-step, its dtype= item says it)")
    parser.add_argument("--tuning", default="pruned", choices=["pruned", "full"],
                        help="whose autotune configs: the default pruned search or the full one")
    parser.add_argument("--first-step", type=parse_first_step, metavar="T=..,D=..,C=..[,dropout=..][,dtype=..]",
                        help="compile only what a cold first training step autotunes over, and sum the time")
    parser.add_argument("--kernel", nargs="+", default=None, choices=ATTENTION_KERNELS + LN_KERNELS)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--out", type=Path, default=None, help="write compile_check.csv / .json here")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    if args.first_step and (args.quick or args.dtype):  # they pick the matrix, which --first-step replaces
        parser.error(f"{'--quick' if args.quick else '--dtype'} does not apply to --first-step, whose spec gives the "
                     "sizes and the dtype (dtype=bf16|fp16|fp32)")
    if args.out is not None:
        make_out(parser, args.out)
    try:
        return _check(args)
    except KeyboardInterrupt:  # the pool's workers got the same Ctrl-C; nothing was written
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _check(args: argparse.Namespace) -> int:
    if args.first_step:
        cases = args.first_step.cases(args.tuning)
    else:
        cases = problems(args.quick, args.dtype or ["bf16", "fp16", "fp32"], args.tuning)
    cases = [c for c in cases if args.kernel is None or c.kernel in args.kernel]
    started = time.perf_counter()
    results = run(cases, args.arch, args.jobs, args.one_config)
    print(summary(results))
    if args.first_step:
        print(first_step_report(args.first_step, args.tuning, results))
    print(f"{len(results)} compiles for sm_{args.arch} in {time.perf_counter() - started:.0f} s "
          f"(shared memory limit {SHARED_LIMIT[args.arch]} bytes)")
    if args.out:
        write(results, args.out, args.arch)
    bad = unrunnable(results)
    for key in bad:
        print(f"FAIL: no config of {key} compiles within sm_{args.arch}'s limits", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
