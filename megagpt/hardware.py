"""GPUs megagpt knows (dense peaks, memory), which one this is, whether bf16 is native here (and so what
`train.dtype: auto` means), and model FLOPs utilisation (MFU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megagpt.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the device reports (nvidia-smi's MiB / 1024), not the marketing GB
    bf16_tflops: float  # dense tensor-core peak (the datasheets' "with sparsity" figures halved)
    tf32_tflops: float  # dense TF32 peak: what fp32 matmuls reach with torch's TF32 allowed
    matches: tuple[str, ...]  # all of these substrings (lower case) appear in torch.cuda.get_device_name()


# Datasheet dense peaks (NVIDIA A100 / H100 / H200 datasheets). A100 PCIe and SXM share the tensor-core peak.
# More specific entries come first: detect_gpu() takes the first whose `matches` all appear in the name.
GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("H200", 140.4, 989.4, 494.7, ("h200",)),
        GPU("H100-PCIe", 79.6, 756.0, 378.0, ("h100", "pcie")),
        GPU("H100-NVL", 93.6, 835.5, 417.8, ("h100", "nvl")),
        GPU("H100-SXM", 79.6, 989.4, 494.7, ("h100",)),
        GPU("A100-80GB", 80.0, 312.0, 156.0, ("a100", "80gb")),
        GPU("A100-40GB", 40.0, 312.0, 156.0, ("a100",)),
    ]
}
ALIASES = {"h100": "H100-SXM", "h100-80gb": "H100-SXM", "a100": "A100-80GB", "a100-80": "A100-80GB",
           "a100-40": "A100-40GB"}


def gpu_by_name(name: str) -> GPU:
    """The table entry for a user-typed name (case-insensitive, aliases such as H100 -> H100-SXM)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    for gpu in GPUS.values():
        if gpu.name.lower() == key.lower():
            return gpu
    known = ", ".join(list(GPUS) + [a for a in ALIASES if a.upper() not in GPUS])
    raise UserError(f"unknown GPU {name!r}; known: {known} (or give --gpu-mem-gib and --peak-tflops)")


def gpu_from_device_name(device_name: str) -> GPU | None:
    """Match a CUDA device name such as 'NVIDIA H100 80GB HBM3' against the table."""
    lowered = device_name.lower()
    return next((g for g in GPUS.values() if all(m in lowered for m in g.matches)), None)


def detect_gpu() -> GPU | None:
    """This process's CUDA device 0 as a table entry; None on CPU or for a GPU not in the table."""
    import torch

    if not torch.cuda.is_available():
        return None
    return gpu_from_device_name(torch.cuda.get_device_name())


def cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_flags(cpuinfo_text: str) -> list[str]:
    """The CPU flags that make bf16 matmuls native: AVX-512 BF16 and AMX (Intel Sapphire Rapids, AMD Zen 4+)."""
    flags = set()
    for line in cpuinfo_text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def native_bf16() -> bool:
    """bf16 matmuls in hardware on this process's device: a CUDA GPU of sm_80 or later, else the CPU's flags."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()[0] >= 8
    return bool(cpu_bf16_flags(cpuinfo()))


def resolve_dtype(dtype: str) -> str:
    """`train.dtype` as a run trains: `auto` is bf16 where bf16 is native (emulated bf16 is slower than fp32),
    else fp32; any other value as it is."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16() else "fp32"


def peak_flops(dtype: str = "bf16", override: float | None = None) -> float | None:
    """Peak FLOP/s of one GPU for `dtype` (bf16 | fp16 | fp32): the override if given (e.g. the config's
    logging.peak_flops), else the detected GPU's dense peak, else None (CPU or unknown GPU: no MFU)."""
    if override is not None:
        return float(override)
    gpu = detect_gpu()
    return None if gpu is None else dense_peak_flops(gpu, dtype)


def dense_peak_flops(gpu: GPU, dtype: str) -> float:
    """The GPU's dense peak FLOP/s for dtype: TF32 tensor cores for fp32, else bf16/fp16 ones."""
    return (gpu.tf32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12


def mfu(tokens_per_sec: float, flops_per_token: float, world_size: int,
        peak_flops_per_gpu: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all GPUs.

    tokens_per_sec counts the whole job's tokens (all ranks); flops_per_token is GPT.flops_per_token()
    (6N + 12·L·T·d: recomputation from activation checkpointing is not counted, as in PaLM's MFU).
    None when the peak is unknown."""
    if not peak_flops_per_gpu or peak_flops_per_gpu <= 0:
        return None
    return tokens_per_sec * flops_per_token / (world_size * peak_flops_per_gpu)
