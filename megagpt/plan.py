"""`megagpt plan CONFIG`: what fits on your GPUs (ZeRO stage, micro batch, checkpointing), what it communicates,
and its speed."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import yaml

from megagpt import hardware
from megagpt import plan_comm as pc
from megagpt import plan_memory as pm
from megagpt.config import Config, load_config, with_dtype
from megagpt.errors import UserError

GIB = 2**30
MEMORY_MARGIN = 0.10  # of the GPU's memory, for the allocator's fragmentation, CUDA context, NCCL and
# DeepSpeed's communication buckets and kernel workspaces, none of which the accounting counts
DEFAULT_MFU = 0.40


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt plan", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("config", help="YAML config, e.g. configs/gpt3_13b.yaml")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs in the job (default 8)")
    p.add_argument("--gpu", help=f"GPU type: {', '.join(hardware.GPUS)} (default: the one detected)")
    p.add_argument("--gpu-mem-gib", type=float, help="memory per GPU in GiB (overrides the GPU's)")
    p.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s per GPU (overrides the GPU's)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed MFU (default {DEFAULT_MFU})")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--intra-node-gbps", type=float,
                   help="GB/s (gigabytes) per GPU per direction inside a node (default: the GPU's NVLink/PCIe)")
    p.add_argument("--inter-node-gbps", type=float,
                   help="GB/s (gigabytes) per node per direction between nodes, all NICs together "
                        "(default: 8 InfiniBand ports of the GPU's generation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_layer=48 (repeatable, as for megagpt train)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write", action="store_true",
                   help="write the chosen zero_stage, micro_batch_size, activation_checkpointing into CONFIG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.gpus < 1 or not 0 < args.mfu <= 1 or args.gpus_per_node < 1:
        raise UserError(f"--gpus and --gpus-per-node must be >= 1 and --mfu in (0, 1] "
                        f"(got {args.gpus}, {args.gpus_per_node}, {args.mfu})")
    for flag in ("--gpu-mem-gib", "--peak-tflops", "--intra-node-gbps", "--inter-node-gbps"):
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None and not (value > 0 and math.isfinite(value)):  # also false for nan
            raise UserError(f"{flag} must be a finite number > 0 (got {value})")
    cfg = load_config(args.config, args.overrides)
    if cfg.train.dtype == "auto":  # every GPU megagpt plans for (A100 and later) does bf16 natively
        cfg = with_dtype(cfg, "bf16")
    gpu_name, mem_gib, peak = _hardware(args, cfg.train.dtype)
    network = pc.network_for(gpu_name, args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps)
    result = plan(cfg, args.gpus, gpu_name, mem_gib, peak, args.mfu, network)
    result["config"] = args.config
    print(json.dumps(result, indent=2) if args.json else render(result))
    if args.write:
        write_choice(Path(args.config), result["choice"], planned_for(args))
    return 0


def _hardware(args, dtype: str) -> tuple[str, float, float]:
    gpu = hardware.gpu_by_name(args.gpu) if args.gpu else hardware.detect_gpu()
    if gpu is None and (args.gpu_mem_gib is None or args.peak_tflops is None):
        raise UserError("no known GPU detected: give --gpu NAME, or --gpu-mem-gib and --peak-tflops")
    mem = args.gpu_mem_gib if args.gpu_mem_gib is not None else gpu.memory_gib
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    else:
        peak = hardware.dense_peak_flops(gpu, dtype)
    return (gpu.name if gpu else "custom"), mem, peak


# ---------------------------------------------------------------------------------------------
# The plan: pure function of the config and the hardware, returns plain data (the --json output)
# ---------------------------------------------------------------------------------------------
def plan(cfg: Config, gpus: int, gpu_name: str, gpu_mem_gib: float, peak_flops: float, mfu: float,
         network: pc.Network | None = None) -> dict:
    m, t = cfg.model, cfg.train
    if m.vocab_size is None:
        raise UserError(f"{cfg.name}: model.vocab_size is null; (--set model.vocab_size=N)")
    params = pm.count_params(m)
    e = pm.BYTES_PER_ELEMENT[t.dtype]
    usable = gpu_mem_gib * (1 - MEMORY_MARGIN) * GIB
    batch = _batch(cfg, gpus)
    hpz = pc.hpz_partition_size(cfg.deepspeed.extra.get("zero_optimization", {}))

    def states(stage: int) -> float:  # with hpZ's secondary copy of the weights where the config turns it on
        hpz_copy = pc.hpz_bytes(params.total, hpz) if stage == 3 and hpz > 1 else 0
        return pm.model_state_bytes(params, stage, gpus) + hpz_copy

    def need(stage: int, b: int, ckpt: bool) -> float:
        return states(stage) + pm.activation_bytes(m, b, e, ckpt)

    choice = _choose(batch["micro_batch_candidates"], need, usable)
    if choice is None:
        needed = need(3, 1, True) / GIB
        raise UserError(
            f"{cfg.name} does not fit even with ZeRO-3, micro batch 1 and activation checkpointing: needs "
            f"{needed:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable on {gpus} × {gpu_mem_gib:g} GiB "
            f"({MEMORY_MARGIN:.0%} margin); use more GPUs, bigger GPUs or offload")
    stage, b, ckpt = choice
    flops = pm.flops_per_token(m, params)
    tokens_per_sec = gpus * peak_flops * mfu / flops
    step_tokens = batch["global_batch_tokens"] or b * (_accum(batch, b) or 1) * m.block_size * gpus
    network = network or pc.network_for(gpu_name)
    comm = communication(cfg, params.total, gpus, stage, b, _accum(batch, b) or 1, e,
                         step_tokens / tokens_per_sec, network)
    if "with_zeropp" in comm:  # hpZ's secondary weight partition costs memory (counted in need() if already on)
        added = pc.hpz_bytes(params.total, network.gpus_per_node) if hpz == 1 else 0
        comm["with_zeropp"]["memory_gib"] = (need(stage, b, ckpt) + added) / GIB
    return {
        "gpus": gpus,
        "gpu": {"name": gpu_name, "memory_gib": gpu_mem_gib, "peak_tflops": peak_flops / 1e12,
                "usable_gib": usable / GIB, "margin": MEMORY_MARGIN},
        "model": {"n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "head_dim": m.head_dim,
                  "block_size": m.block_size, "vocab_size": m.vocab_size, "attention": m.attention,
                  "dtype": t.dtype},
        "params": {"total": params.total, "non_embedding": params.non_embedding,
                   "largest_module": params.largest_module},
        "flops_per_token": flops,
        "batch": batch,
        "memory_gib": {
            f"zero{z}": {
                "model_states": states(z) / GIB,
                "activations": pm.activation_bytes(m, b, e, False) / GIB,
                "activations_checkpointed": pm.activation_bytes(m, b, e, True) / GIB,
                "total": need(z, b, False) / GIB,
                "total_checkpointed": need(z, b, True) / GIB,
            }
            for z in range(4)
        },
        "micro_batches": [
            {"micro_batch_size": mb, "total_gib": need(stage, mb, False) / GIB,
             "total_checkpointed_gib": need(stage, mb, True) / GIB}
            for mb in batch["micro_batch_candidates"]
        ],
        "choice": {"zero_stage": stage, "micro_batch_size": b, "activation_checkpointing": ckpt,
                   "grad_accum_steps": _accum(batch, b), "memory_gib": need(stage, b, ckpt) / GIB},
        "speed": {"mfu": mfu, "tokens_per_sec": tokens_per_sec, "tokens_per_day": tokens_per_sec * 86400,
                  "step_seconds": step_tokens / tokens_per_sec,
                  "days_for_max_steps": t.max_steps * step_tokens / tokens_per_sec / 86400,
                  "max_steps": t.max_steps},
        "communication": comm,
    }


def communication(cfg: Config, params: int, gpus: int, stage: int, micro: int, accum: int, e: int,
                  compute_seconds: float, network: pc.Network) -> dict:
    """Per ZeRO stage the bytes and seconds of a step's collectives; for the chosen stage what DeepSpeed does
    with this config's zero_optimization (overlap_comm, ZeRO++), whether it is communication-bound, remedies."""
    zero = cfg.deepspeed.extra.get("zero_optimization", {})
    overlap_comm, zeropp = pc.switch(zero, "overlap_comm"), pc.zeropp_in(zero)

    def at(z: int, parts: frozenset[str] = frozenset()) -> dict:
        return pc.step(params, z, gpus, accum, e, compute_seconds, network, overlap_comm, parts)

    chosen = at(stage, zeropp if stage == 3 else frozenset())
    result = {
        "assumes": "gradients and weights communicated in the training dtype; ZeRO-2/3 every micro-batch",
        "network": {"gpus_per_node": network.gpus_per_node, "nodes": -(-gpus // network.gpus_per_node),
                    "intra": network.intra_name, "intra_gbytes_per_s": network.intra_gbytes_per_s,
                    "inter": network.inter_name, "inter_gbytes_per_s": network.inter_gbytes_per_s,
                    "gbytes_per_s_per_gpu": network.bandwidth(gpus) / pc.GB},
        "micro_batch_size": micro, "grad_accum_steps": accum,
        "stages": {f"zero{z}": at(z) for z in range(4)},
        "choice": {**chosen, "zero_stage": stage, "zeropp": sorted(zeropp)},
        "remedies": pc.remedies(stage, accum, micro, chosen["overlap"], gpus, network.gpus_per_node,
                                cfg.train.global_batch_tokens, zeropp),
    }
    if stage == 3 and gpus > network.gpus_per_node and zeropp != frozenset(pc.ZEROPP):
        result["with_zeropp"] = at(3, frozenset(pc.ZEROPP))
    return result


def _batch(cfg: Config, gpus: int) -> dict:
    """Sequences per GPU per step and the micro batches that split them (powers of two)."""
    tokens, T = cfg.train.global_batch_tokens, cfg.model.block_size
    if tokens is None:  # no global batch: any power of two up to 64 sequences per GPU, train.grad_accum_steps
        # (else 1) of them per step
        return {"global_batch_tokens": None, "sequences_per_gpu": None, "splits_evenly": True,
                "micro_batch_candidates": [2**k for k in range(7)],
                "grad_accum_steps": cfg.train.grad_accum_steps or 1}
    per_gpu = tokens / (T * gpus)
    even = tokens % (T * gpus) == 0
    limit = int(per_gpu) if even else max(1, int(per_gpu))
    candidates = [2**k for k in range(limit.bit_length()) if (not even or int(per_gpu) % 2**k == 0)]
    return {"global_batch_tokens": tokens, "sequences_per_gpu": per_gpu, "splits_evenly": even,
            "micro_batch_candidates": candidates, "grad_accum_steps": None}  # follows from the micro batch


def _choose(candidates: list[int], need, usable: float) -> tuple[int, int, bool] | None:
    """The smallest ZeRO stage that fits, checkpointing off if that fits, then the largest micro batch."""
    for stage in range(4):
        for ckpt in (False, True):
            fitting = [b for b in candidates if need(stage, b, ckpt) <= usable]
            if fitting:
                return stage, max(fitting), ckpt
    return None


def _accum(batch: dict, micro: int) -> int | None:
    if batch["grad_accum_steps"] is not None:
        return batch["grad_accum_steps"]
    per_gpu = batch["sequences_per_gpu"]
    return int(per_gpu // micro) if per_gpu is not None and batch["splits_evenly"] else None


# ---------------------------------------------------------------------------------------------
# Output: the table on stdout, and --write into the config file
# ---------------------------------------------------------------------------------------------
def render(r: dict) -> str:
    m, p, g, c, s, bt = r["model"], r["params"], r["gpu"], r["choice"], r["speed"], r["batch"]
    on = lambda flag: "on" if flag else "off"
    lines = [
        f"megagpt plan: {r['config']} on {r['gpus']} × {g['name']} ({g['memory_gib']:g} GiB, "
        f"{g['peak_tflops']:.0f} TFLOP/s dense {m['dtype']}), MFU {s['mfu']:.2f}",
        f"model     {m['n_layer']} layers × {m['n_embd']} wide, {m['n_head']} heads of {m['head_dim']}, "
        f"context {m['block_size']}, vocab {m['vocab_size']}, attention {m['attention']}",
        f"params    {_si(p['total'])} total, {_si(p['non_embedding'])} without embeddings, "
        f"largest module {_si(p['largest_module'])}",
        f"FLOPs     {r['flops_per_token'] / 1e9:.2f} GFLOP per token (6N + 12·L·T·d)",
    ]
    if bt["global_batch_tokens"] is not None:
        lines.append(f"batch     {bt['global_batch_tokens']} tokens = "
                     f"{bt['sequences_per_gpu']:g} sequences per GPU")
    if not bt["splits_evenly"]:
        lines.append(f"WARNING   the global batch does not split evenly over {r['gpus']} GPUs: DeepSpeed "
                     "needs global batch = micro batch × grad accum × GPUs; change --gpus or "
                     "train.global_batch_tokens")
    lines += ["", f"memory per GPU in GiB at micro batch {c['micro_batch_size']} "
                  f"(usable {g['usable_gib']:.1f} = {1 - g['margin']:.0%} of {g['memory_gib']:g})",
              f"{'':8}{'states':>9}{'act':>9}{'act ckpt':>10}{'total':>9}{'total ckpt':>12}"]
    for stage, row in r["memory_gib"].items():
        lines.append(f"{stage:8}{row['model_states']:9.1f}{row['activations']:9.1f}"
                     f"{row['activations_checkpointed']:10.1f}{row['total']:9.1f}{row['total_checkpointed']:12.1f}")
    lines += ["", f"micro batches at ZeRO-{c['zero_stage']} (GiB per GPU)",
              f"{'micro':>8}{'total':>9}{'total ckpt':>12}"]
    for row in r["micro_batches"]:
        lines.append(f"{row['micro_batch_size']:8}{row['total_gib']:9.1f}{row['total_checkpointed_gib']:12.1f}")
    accum = "" if c["grad_accum_steps"] is None else f", grad accum {c['grad_accum_steps']}"
    lines += ["",
              f"choice    ZeRO-{c['zero_stage']}, micro batch {c['micro_batch_size']}, activation "
              f"checkpointing {on(c['activation_checkpointing'])}{accum}: "
              f"{c['memory_gib']:.1f} of {g['usable_gib']:.1f} GiB",
              f"compute   {s['tokens_per_sec']:,.0f} tokens/s, {s['tokens_per_day'] / 1e9:.2f}B tokens/day, "
              f"step {s['step_seconds']:.2f} s; max_steps {s['max_steps']} "
              f"in {s['days_for_max_steps']:.1f} days (at MFU {s['mfu']:g}, before communication: see comm)"]
    if c["activation_checkpointing"]:
        lines.append("          (checkpointing recomputes the forward: GPUs run ~4/3 busier for this MFU)")
    return "\n".join(lines + [""] + render_communication(r["communication"], s, g["usable_gib"]))


def render_communication(comm: dict, speed: dict, usable_gib: float) -> list[str]:
    """The per-stage table, the chosen plan's verdict, ZeRO++'s effect and the remedies."""
    net, ch = comm["network"], comm["choice"]
    lines = [f"communication per GPU per step at micro batch {comm['micro_batch_size']}, grad accum "
             f"{comm['grad_accum_steps']} ({net['nodes']} node(s) of {net['gpus_per_node']}; {net['intra']} "
             f"{net['intra_gbytes_per_s']:g} GB/s per GPU, {net['inter']} {net['inter_gbytes_per_s']:g} GB/s per "
             f"node: {net['gbytes_per_s_per_gpu']:g} GB/s per GPU for this job's rings)",
             f"{'':8}{'sends GB':>10}{'comm s':>9}{'compute s':>11}{'overlapped s':>14}{'serial s':>10}"]
    for stage, row in comm["stages"].items():
        lines.append(f"{stage:8}{row['bytes_per_gpu'] / pc.GB:10.1f}{row['comm_seconds']:9.2f}"
                     f"{row['compute_seconds']:11.2f}{row['step_seconds_overlapped']:14.2f}"
                     f"{row['step_seconds_serial']:10.2f}")
    how = "overlapped" if ch["overlap"] else "serial: DeepSpeed does not overlap it with this config"
    zeropp = f" with ZeRO++ {'+'.join(ch['zeropp'])}" if ch["zeropp"] else ""
    verdict = "COMMUNICATION-BOUND" if ch["communication_bound"] else "compute-bound"
    mfu, slower = speed["mfu"], ch["step_seconds"] / ch["compute_seconds"]
    lines.append(f"comm      ZeRO-{ch['zero_stage']}{zeropp}: {ch['comm_seconds']:.2f} s of communication vs "
                 f"{ch['compute_seconds']:.2f} s of compute: {verdict}; step {ch['step_seconds']:.2f} s ({how}), "
                 f"MFU {mfu / slower:.2f}, max_steps in {speed['days_for_max_steps'] * slower:.1f} days")
    if "with_zeropp" in comm:
        zp = comm["with_zeropp"]
        lines.append(f"          with ZeRO++ hpZ+qwZ+qgZ: {zp['bytes_per_gpu'] / pc.GB:.1f} GB, "
                     f"{zp['comm_seconds']:.2f} s of communication, step {zp['step_seconds']:.2f} s, "
                     f"MFU {mfu * zp['compute_seconds'] / zp['step_seconds']:.2f}; hpZ's weight copy makes it "
                     f"{zp['memory_gib']:.1f} GiB per GPU"
                     + (f", more than the {usable_gib:.1f} usable" if zp["memory_gib"] > usable_gib else ""))
    if comm["remedies"] and (ch["communication_bound"] or ch["comm_seconds"] > 0.1 * ch["compute_seconds"]):
        lines.append("remedies  (DeepSpeed's own; megagpt passes deepspeed.extra into the DeepSpeed config)")
        for remedy in comm["remedies"]:
            value = str(remedy["value"]).lower() if isinstance(remedy["value"], bool) else remedy["value"]
            lines.append(f"  --set {remedy['key']}={value}   # {remedy['why']}")
    return lines


def _si(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def planned_for(args) -> dict:
    """The `planner:` section --write records: the hardware and overrides this plan was made for."""
    keys = ("gpus", "gpu", "gpu_mem_gib", "peak_tflops", "gpus_per_node")
    section = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.overrides:
        section["overrides"] = list(args.overrides)
    return section


def planner_args(cfg: Config, config_path: str) -> list[str]:
    """`megagpt plan` arguments that re-make the plan a config's `planner:` section records."""
    p = cfg.planner
    args = [config_path, "--gpus", str(p.gpus)]
    for flag, value in (("--gpu", p.gpu), ("--gpu-mem-gib", p.gpu_mem_gib), ("--peak-tflops", p.peak_tflops),
                        ("--gpus-per-node", p.gpus_per_node)):
        args += [flag, str(value)] if value is not None else []
    return args + [arg for item in p.overrides for arg in ("--set", item)]


PLANNED_KEYS = {"zero_stage": "deepspeed", "micro_batch_size": "train", "activation_checkpointing": "model"}


def write_choice(path: Path, choice: dict, planned: dict) -> None:
    """The planned keys set in place and the `planner:` section replaced, every other line of the file as it
    was (comments, number formats, order); validated before it replaces the file."""
    text = path.read_bytes().decode()  # as it is: a CRLF file keeps its line ends
    for section in {*PLANNED_KEYS.values(), "planner"}:
        _refuse_flow_style(path, text, section)
    for key, section in PLANNED_KEYS.items():
        text = _set_key(text, section, key, choice[key])
    text = _drop_section(text, "planner").rstrip("\r\n") + "\n" + yaml.safe_dump({"planner": planned}, sort_keys=False)
    if "\r\n" in text:  # the lines added in a CRLF file end as its others do
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(text.encode())
    try:
        load_config(tmp)  # `base:` resolves from the same folder
    except UserError as e:
        tmp.unlink()
        raise UserError(f"--write: {str(e).replace(str(tmp), str(path))} (as it would be written; {path} is "
                        f"unchanged)") from None
    os.replace(tmp, path)
    print(f"wrote {path}: " + ", ".join(f"{section}.{key}={choice[key]}" for key, section in PLANNED_KEYS.items())
          + " and its planner: section (its comments are left as they were)")


def _refuse_flow_style(path: Path, text: str, section: str) -> None:
    """--write edits a section as a block of indented `key: value` lines; one written on its own line
    (`train: {micro_batch_size: 4}`) is refused, naming the line, before anything is written."""
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"{section}:\s*[^\s#]", line):
            raise UserError(f"{path}, line {number}: --write edits `{section}:` as a block of indented key: value "
                            f"lines, not a value on the same line; rewrite it so, or set the planned keys by hand")


def _section_span(lines: list[str], section: str) -> tuple[int, int] | None:
    """[start, end) of a top-level `section:` block (its indented lines), or None."""
    start = next((i for i, line in enumerate(lines) if re.match(rf"{section}:\s*(#.*)?$", line)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()),
               len(lines))
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block are not its own
        end -= 1
    return start, end


def _set_key(text: str, section: str, key: str, value) -> str:
    """`section.key: value` in the YAML text: the value on its own line replaced (a trailing comment kept), or
    the line added at the end of the section (the section added at the end of the file)."""
    lines, scalar = text.splitlines(keepends=True), yaml.safe_dump(value).removesuffix("\n...\n").strip()
    span = _section_span(lines, section)
    if span is None:
        return text.rstrip("\n") + f"\n{section}:\n  {key}: {scalar}\n"
    start, end = span
    for i in range(start + 1, end):
        found = re.match(rf"(\s+{key}:)\s*[^#\n]*?([ \t]+#.*?)?(\r?\n?)$", lines[i])  # CRLF: \r kept
        if found:
            lines[i] = f"{found[1]} {scalar}{found[2] or ''}{found[3]}"
            return "".join(lines)
    indent = next((line[: len(line) - len(line.lstrip())] for line in lines[start + 1:end] if line.strip()), "  ")
    lines.insert(end, f"{indent}{key}: {scalar}\n")
    return "".join(lines)


def _drop_section(text: str, section: str) -> str:
    lines = text.splitlines(keepends=True)
    span = _section_span(lines, section)
    return text if span is None else "".join(lines[: span[0]] + lines[span[1]:])
