"""The GPU autotune search spaces of both kernels: the wide one (`full`) and the default `pruned` one.

Every config the autotuner tries is compiled before it is timed, so a search's size is the pause before a cold
first step: `full` compiles 62 attention configs per key (minutes), `pruned` at most 8 (docs/kernels.md, "The
autotune search"; `python -m kernels.compile_check --first-step ...` measures it). The interpreter ignores both.
"""

from __future__ import annotations

import math

import triton

TUNINGS = ("pruned", "full")


def check_tuning(tuning: str) -> None:
    if tuning not in TUNINGS:
        raise ValueError(f"kernels: tuning must be one of {', '.join(TUNINGS)}, got {tuning!r}")


# ----------------------------------------------------------------------------------------------------
# Causal attention: (BLOCK_M, BLOCK_N) tiles x warps x pipeline stages, keyed on T, D, dropout and dtype
# ----------------------------------------------------------------------------------------------------
def _configs(pairs, warps=(4, 8), stages=(2, 3, 4)):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in pairs for w in warps for s in stages]


# `full`: the wide search (62 configs per key; a cold first step compiles all of them, minutes).
ATTENTION_CONFIGS = {
    "fwd": _configs([(128, 64), (128, 128), (128, 32), (64, 64), (64, 32)]),
    "dkdv": _configs([(32, 128), (64, 128), (32, 64), (64, 64)], stages=(2, 3)),
    "dq": _configs([(128, 32), (128, 64), (64, 32), (64, 64)], stages=(2, 3)),
}
# `pruned` (the default): at most 8 configs per key, (BLOCK_M, BLOCK_N, warps, stages), all from ATTENTION_CONFIGS,
# picked by head dim (BLOCK_D <= 64: narrow, 128: wide), dropout and dtype from kernels.compile_check's sm_90
# tables (docs/benchmarks.md: spill-free where any config is, 4-warp 128-row tiles dropped where they spill) and
# the known-good Hopper tiles (FlashAttention-2 and Triton's fused-attention tutorial: forward 128 x 64,
# dK/dV 32 x 128, dQ 128 x 32). Every list holds a small tile that fits sm_90's shared memory at any shape.
PRUNED_TILES = {
    ("fwd", "narrow", False): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    ("fwd", "narrow", True): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    ("fwd", "wide", False): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                             (64, 32, 4, 2)],
    ("fwd", "wide", True): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    ("dkdv", "narrow", False): [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 3)],
    ("dkdv", "narrow", True): [(32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2)],
    ("dkdv", "wide", False): [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 2), (32, 64, 8, 2)],
    ("dkdv", "wide", True): [(32, 64, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3)],
    ("dq", "narrow", False): [(128, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3)],
    ("dq", "narrow", True): [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
    ("dq", "wide", False): [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
    ("dq", "wide", True): [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (64, 32, 8, 2)],
}
# fp32 runs IEEE FMA dots (the exact path, not a fast one): every tile spills and one compile takes 0.5-6
# minutes at D = 128, so the smallest tile alone, and no search.
PRUNED_TILES_FP32 = {"fwd": [(64, 32, 4, 2)], "dkdv": [(32, 64, 4, 2)], "dq": [(64, 32, 4, 2)]}


def pruned_tiles(kernel: str, block_d: int, dropout: bool, fp32: bool) -> list[tuple[int, int, int, int]]:
    """The pruned search of one autotune key: (BLOCK_M, BLOCK_N, warps, stages) tuples."""
    if fp32:
        return PRUNED_TILES_FP32[kernel]
    return PRUNED_TILES[(kernel, "wide" if block_d > 64 else "narrow", bool(dropout))]


def attention_pruner(kernel: str):
    """early_config_prune for the autotuner: ATTENTION_CONFIGS narrowed to the key's pruned tiles."""
    def prune(configs, named_args, **meta):
        keep = set(pruned_tiles(kernel, meta["BLOCK_D"], meta["DROPOUT"], meta["PRECISION"] == "ieee"))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return prune


# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------
# LayerNorm: only the warp count is worth searching; the tile is the whole row. 32 warps: at C = 16384 the row's
# registers spill with 16 warps or fewer (python -m kernels.compile_check, docs/kernels.md).
WARPS = (2, 4, 8, 16, 32)
LAYER_NORM_CONFIGS = [triton.Config({}, num_warps=w) for w in WARPS]
# `pruned` (the default) keeps the warp counts that give each thread 4..16 elements of the row (the row is in
# registers: fewer spill, more idle on reductions), or the nearest one when none does (BLOCK_C < 256 or > 16384).
ELEMENTS_PER_THREAD = (4, 16)


def pruned_warps(block_c: int) -> list[int]:
    """The warp counts the pruned search tries for rows of BLOCK_C (a power of two) columns."""
    low, high = ELEMENTS_PER_THREAD
    fitting = [w for w in WARPS if low <= block_c / (32 * w) <= high]
    if fitting:
        return fitting
    return [min(WARPS, key=lambda w: abs(math.log2(block_c / (32 * w) / math.sqrt(low * high))))]


def layer_norm_pruner(configs, named_args, **meta):
    """early_config_prune for the autotuner: the row's pruned warp counts."""
    keep = pruned_warps(meta["BLOCK_C"])
    return [c for c in configs if c.num_warps in keep]
