"""Fused LayerNorm over the last dim in Triton: kernels, launchers, and the `megagpt::` custom ops.

Backward maths, derived once. Per row of C elements, with xhat = (x - mean) * rstd, y = xhat * w + b and
g = dy * w (g = dy without a weight):
    dxhat = g,  dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
    dw = sum_rows dy * xhat,  db = sum_rows dy
dx is finished inside each row's program. dw and db are summed over rows in two steps, so that no atomics are
needed and the result is deterministic: G programs each own a contiguous group of rows and write one fp32
partial row to a (G, C) buffer; a second kernel sums the G partial rows per column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.limits import width_problem
from kernels.runtime import interpreting
from kernels.tuning import LAYER_NORM_CONFIGS, check_tuning, layer_norm_pruner


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _ln_fwd_kernel(
    X,  # (N, C) input rows, unit column stride
    Y,  # (N, C) contiguous output
    W, B,  # (C,) weight and bias (ignored without HAS_WEIGHT / HAS_BIAS)
    MEAN, RSTD,  # (N,) fp32 out: saved for backward
    stride_x,  # row stride of X
    C,  # row length
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,  # C rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    xc = tl.where(ok, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 0) / C + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    X, DY,  # (N, C) input and output gradient, unit column stride
    DX,  # (N, C) contiguous out
    W,  # (C,) weight (ignored without HAS_WEIGHT)
    MEAN, RSTD,  # (N,) fp32 from forward
    DW_PART, DB_PART,  # (G, C) fp32 out: this program's partial dw / db row
    stride_x, stride_dy,  # row strides
    N, C,
    ROWS_PER_PROGRAM,  # rows [pid * R, pid * R + R) belong to program pid
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for row in range(first, tl.minimum(first + ROWS_PER_PROGRAM, N)):
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(ok, (x - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(xhat * g, 0) / C
        c2 = tl.sum(g, 0) / C
        dx = (g - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=ok)
        if HAS_WEIGHT:
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * C + cols, dw, mask=ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * C + cols, db, mask=ok)


@triton.jit
def _column_sum_kernel(
    PART,  # (G, C) fp32 partial sums
    OUT,  # (C,) out, in the parameter's dtype
    G, C,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)
        ok = (rows[:, None] < G) & (cols[None, :] < C)
        acc += tl.sum(tl.load(PART + rows[:, None] * C + cols[None, :], mask=ok, other=0.0), 0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cols < C)


_LN_KEY = ["BLOCK_C", "HAS_WEIGHT", "HAS_BIAS"]
_ROW_KERNELS = {"fwd": _ln_fwd_kernel, "bwd": _ln_bwd_kernel}
TUNED = {  # Hopper search spaces (kernels/tuning.py); winners on disk (cache_results), as attention's
    "full": {k: triton.autotune(LAYER_NORM_CONFIGS, key=_LN_KEY, cache_results=True)(fn)
             for k, fn in _ROW_KERNELS.items()},
    "pruned": {k: triton.autotune(LAYER_NORM_CONFIGS, key=_LN_KEY, cache_results=True,
                                  prune_configs_by={"early_config_prune": layer_norm_pruner})(fn)
               for k, fn in _ROW_KERNELS.items()},
}
COLUMN_SUM_TILE = {"gpu": (32, 128), "interpreter": (16, 128)}  # (BLOCK_G, BLOCK_C) of the untuned column sums


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def forward_args(x2, y, weight, bias, mean, rstd, eps: float) -> tuple:
    """The forward kernel's runtime arguments over (N, C) rows (shared with kernels.compile_check)."""
    return (x2, y, weight, bias, mean, rstd, x2.stride(0), x2.shape[1], eps)


def backward_args(x2, dy2, dx, weight, mean, rstd, dw_part, db_part, rows_per_program: int) -> tuple:
    """The row kernel's runtime arguments of the backward."""
    N, C = x2.shape
    return (x2, dy2, dx, weight, mean, rstd, dw_part, db_part, x2.stride(0), dy2.stride(0), N, C, rows_per_program)


def row_meta(C: int, weight, bias) -> dict:
    """The constexprs both row kernels compile for."""
    return dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=triton.next_power_of_2(C))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (N, C) rows with unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unit_stride(p: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias as the kernels read it, (C,) with unit stride (a strided view would be read wrongly)."""
    return None if p is None else p.contiguous()


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       tuning: str = "pruned"):
    """Launch the forward kernel: returns y (x's shape and dtype), mean and rstd (N,) in fp32."""
    C = x.shape[-1]
    x2, weight, bias = _rows(x), _unit_stride(weight), _unit_stride(bias)
    N = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, mean, rstd
    kernel = _ln_fwd_kernel if interpreting(x) else TUNED[tuning]["fwd"]
    kernel[(N,)](*forward_args(x2, y, weight, bias, mean, rstd, eps), **row_meta(C, weight, bias))
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, bias, mean, rstd, tuning: str = "pruned"):
    """Launch the row kernel and the column sums: dx, dw, db (dw/db empty when the parameter is None)."""
    C = x.shape[-1]
    x2, dy2, weight = _rows(x), _rows(dy), _unit_stride(weight)
    N = x2.shape[0]
    interpret = interpreting(x)
    groups = min(N, 4 if interpret else 2 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    groups = max(groups, 1)
    rows_per_program = triton.cdiv(N, groups)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_part = torch.zeros((groups, C), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((groups, C), dtype=torch.float32, device=x.device)
    if N > 0:
        kernel = _ln_bwd_kernel if interpret else TUNED[tuning]["bwd"]
        kernel[(groups,)](*backward_args(x2, dy2, dx, weight, mean, rstd, dw_part, db_part, rows_per_program),
                          **row_meta(C, weight, bias))
    dw = _column_sum(dw_part, weight.dtype, interpret) if weight is not None else x.new_empty(0)
    db = _column_sum(db_part, bias.dtype, interpret) if bias is not None else x.new_empty(0)
    return dx, dw, db


def _column_sum(part: torch.Tensor, dtype: torch.dtype, interpret: bool) -> torch.Tensor:
    G, C = part.shape
    out = torch.empty(C, dtype=dtype, device=part.device)
    block_g, block_c = COLUMN_SUM_TILE["interpreter" if interpret else "gpu"]
    _column_sum_kernel[(triton.cdiv(C, block_c),)](part, out, G, C, BLOCK_G=block_g, BLOCK_C=block_c)
    return out


# ----------------------------------------------------------------------------------------------------
# Custom ops and the public function
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("megagpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, tuning: str = "pruned") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_forward(x, weight, bias, eps, tuning)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, tuning="pruned"):
    N = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(N, dtype=torch.float32), x.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("megagpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, mean: torch.Tensor,
                       rstd: torch.Tensor, tuning: str = "pruned") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dy, x, weight, bias, mean, rstd, tuning)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, tuning="pruned"):
    dw = x.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    db = x.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, tuning = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.tuning = tuning
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.megagpt.layer_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.tuning)
    return dx, (dw if weight is not None else None), (db if bias is not None else None), None, None


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, tuning: str = "pruned") -> torch.Tensor:
    """LayerNorm over the last dim of x (any leading shape); weight and bias (C,) are optional. `tuning` is the
    GPU autotune search: "pruned" (the default) or "full" (every warp count)."""
    check_tuning(tuning)
    if x.dim() == 0:  # F.layer_norm refuses it too: a scalar has no last dim to normalise over
        raise ValueError("layer_norm: x is a 0-dim tensor (a scalar); it needs a last dim C to normalise over")
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"layer_norm: {name} must have shape ({C},) to match x's last dim, "
                             f"got {tuple(p.shape)}")
    if (problem := width_problem(C)) is not None:
        raise ValueError(f"layer_norm: last dim C={C} {problem}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"layer_norm: x must be fp32/fp16/bf16, got {x.dtype}")
    return torch.ops.megagpt.layer_norm_fwd(x, weight, bias, float(eps), tuning)[0]
