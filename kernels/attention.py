"""Fused causal attention (FlashAttention-2 in Triton): kernels, launchers, and the `megagpt::` custom ops.

Layout: q, k, v are (B, H, T, D), any strides. Forward keeps one (BLOCK_M, D) query tile in registers and
streams key/value tiles through an online softmax with fp32 accumulators; it saves only O and the per-row
log-sum-exp.
Tiles above the diagonal are never visited, and no T x T tensor exists in forward or backward.

Backward maths, derived once. Per (batch, head), with s = softmax_scale, r = 1/(1-p), Z the dropout keep-mask:
    S = s Q K^T (causal-masked),  P = softmax(S) row-wise,  P~ = r (Z * P),  O = P~ V
    dV  = P~^T dO
    dP~ = dO V^T,            dP = r (Z * dP~)
    dS  = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_j P~_ij (dO_i . V_j) = dO_i . O_i
    dQ  = s dS K,            dK = s dS^T Q
So delta = rowsum(dO * O) needs no T x T tensor, dropout included, and P is rebuilt tile by tile from the
saved log-sum-exp: P_ij = exp2(S_ij log2(e) - lse_i), lse kept in base 2 (exp2 is the fast instruction).
The dropout mask Z is never stored: Z_ij = u_ij > p, u_ij one of the 4 uniforms of a Philox draw (tl.randint4x)
whose counter is the index of (b, h, i, j // 4) in the virtual (B, H, T, ceil(T/4)) grid of column groups, so
backward draws exactly the mask that forward drew.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.limits import head_dim_problem, seed_problem
from kernels.runtime import interpreting
from kernels.tuning import ATTENTION_CONFIGS, attention_pruner, check_tuning

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _uniform4(seed, bh, T, offs_m, start_n, BLOCK_N: tl.constexpr):
    """Four (len(offs_m), BLOCK_N // 4) uniform tiles, one Philox draw per group of 4 adjacent columns.

    Group g of row i of (b, h) is counter (bh * T + i) * ceil(T / 4) + g; its 4 outputs go to columns
    4g .. 4g + 3. One draw per 4 elements is 4x less Philox work and state than a draw per element.
    """
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counters = (bh * T + offs_m[:, None].to(tl.int64)) * tl.cdiv(T, 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    return (tl.random.uint_to_uniform_float(r0), tl.random.uint_to_uniform_float(r1),
            tl.random.uint_to_uniform_float(r2), tl.random.uint_to_uniform_float(r3))


@triton.jit
def _keep_mask(seed, dropout_p, bh, T, offs_m, start_n, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of a (len(offs_m), BLOCK_N) tile at columns start_n..: one formula for forward,
    backward and tests."""
    u0, u1, u2, u3 = _uniform4(seed, bh, T, offs_m, start_n, BLOCK_N)
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # (M, N/4, 2, 2): [.., k, l] = u_{2k+l}, column 4g + 2k + l
    return tl.reshape(u, [offs_m.shape[0], BLOCK_N]) > dropout_p


@triton.jit
def _keep_mask_t(seed, dropout_p, bh, T, offs_m, start_n, BLOCK_N: tl.constexpr):
    """The same mask for a transposed (BLOCK_N, len(offs_m)) tile, as the dK/dV kernel walks it."""
    u0, u1, u2, u3 = _uniform4(seed, bh, T, offs_m, start_n, BLOCK_N)
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # (M, N/4, 2, 2)
    u = tl.permute(u, (1, 2, 3, 0))  # (N/4, 2, 2, M): row 4g + 2k + l
    return tl.reshape(u, [BLOCK_N, offs_m.shape[0]]) > dropout_p


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    KEEP,  # (B*H, T, T) bool out: True where the attention probability is kept
    T,  # sequence length
    seed,  # philox seed
    dropout_p,  # drop probability
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_mask(seed, dropout_p, bh, T, offs_m, pid_n * BLOCK_N, BLOCK_N)
    ptrs = KEEP + (bh * T + offs_m[:, None]) * T + offs_n[None, :]
    tl.store(ptrs, keep, mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, K_ptrs, V_ptrs, start, stop, stride_kt, stride_vt,
    offs_m, offs_d, bh, T, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [start, stop); CAUSAL_MASK only on tiles that straddle the diagonal."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < T) & d_ok
        k = tl.load(K_ptrs + start_n * stride_kt, mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V_ptrs + start_n * stride_vt, mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if CAUSAL_MASK:  # also masks keys >= T for every stored row (row < T)
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # counts dropped entries too: dropout acts after the softmax
        if DROPOUT:
            keep = _keep_mask(seed, dropout_p, bh, T, offs_m, start_n, BLOCK_N)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])  # a fresh seed each step must not mean a fresh compile
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, T, D) inputs
    O,  # (B, H, T, D) output
    LSE,  # (B*H, T) fp32 out: base-2 log-sum-exp of each row's scaled logits
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T,  # heads, sequence length
    qk_scale,  # softmax_scale * log2(e)
    dropout_p, seed,  # dropout probability and philox seed
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D and D rounded up to a power of two
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query / key tile (BLOCK_M % BLOCK_N == 0)
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    K_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    V_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    row_ok = offs_m < T
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = pid_m * BLOCK_M
    # Tiles fully below the diagonal: no mask at all. Then the diagonal tiles, masked. Nothing above.
    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_ptrs, V_ptrs, 0, diag, stride_kt, stride_vt,
                              offs_m, offs_d, bh, T, qk_scale, dropout_p, seed,
                              HEAD_DIM, BLOCK_N, False, DROPOUT, PRECISION)
    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K_ptrs, V_ptrs, diag, tl.minimum(diag + BLOCK_M, T),
                              stride_kt, stride_vt, offs_m, offs_d, bh, T, qk_scale, dropout_p, seed,
                              HEAD_DIM, BLOCK_N, True, DROPOUT, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_delta_kernel(
    O, DO,  # (B, H, T, D) output and its gradient
    DELTA,  # (B*H, T) fp32 out: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    do_ptrs = (DO + b * stride_dob + h * stride_doh
               + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod)
    o = tl.load(o_ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, Q_ptrs, DO_ptrs, LSE, DELTA, start, stop, stride_qt, stride_dot,
    start_n, offs_n, offs_d, bh, T, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [start, stop), on transposed (N, M) tiles."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T  # rows past T load as zeros and so contribute nothing
        q = tl.load(Q_ptrs + start_m * stride_qt, mask=m_ok[:, None] & d_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO_ptrs + start_m * stride_dot, mask=m_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse[None, :])
        if CAUSAL_MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        if DROPOUT:
            keepT = _keep_mask_t(seed, dropout_p, bh, T, offs_m, start_n, BLOCK_N)
            scale = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keepT, pT * scale, 0.0).to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.where(keepT, dpT * scale, 0.0)
        else:
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, T, D)
    LSE, DELTA,  # (B*H, T) fp32 from forward / the delta kernel
    DK, DV,  # (B, H, T, D) contiguous outputs
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, softmax_scale, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query step / key tile (BLOCK_N % BLOCK_M == 0)
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    Q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    DO_ptrs = (DO + b * stride_dob + h * stride_doh
               + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query tiles on the diagonal (masked), then every query tile below it; none above.
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    dk, dv = _bwd_dkdv_tile(dk, dv, k, v, Q_ptrs, DO_ptrs, LSE, DELTA, start_n, diag_end,
                            stride_qt, stride_dot, start_n, offs_n, offs_d, bh, T, qk_scale, dropout_p, seed,
                            HEAD_DIM, BLOCK_M, BLOCK_N, True, DROPOUT, PRECISION)
    dk, dv = _bwd_dkdv_tile(dk, dv, k, v, Q_ptrs, DO_ptrs, LSE, DELTA, diag_end, T, stride_qt, stride_dot,
                            start_n, offs_n, offs_d, bh, T, qk_scale, dropout_p, seed,
                            HEAD_DIM, BLOCK_M, BLOCK_N, False, DROPOUT, PRECISION)
    out = bh * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse, delta, K_ptrs, V_ptrs, start, stop, stride_kt, stride_vt,
    offs_m, offs_d, bh, T, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [start, stop)."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < T) & d_ok
        k = tl.load(K_ptrs + start_n * stride_kt, mask=kv_ok, other=0.0)
        v = tl.load(V_ptrs + start_n * stride_vt, mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep_mask(seed, dropout_p, bh, T, offs_m, start_n, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, T, D)
    LSE, DELTA,  # (B*H, T) fp32
    DQ,  # (B, H, T, D) contiguous output
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, softmax_scale, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query tile / key step (BLOCK_M % BLOCK_N == 0)
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = (DO + b * stride_dob + h * stride_doh
               + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod)
    q = tl.load(q_ptrs, mask=ok, other=0.0)
    do = tl.load(do_ptrs, mask=ok, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    K_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    V_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = pid_m * BLOCK_M
    dq = _bwd_dq_tile(dq, q, do, lse, delta, K_ptrs, V_ptrs, 0, diag, stride_kt, stride_vt,
                      offs_m, offs_d, bh, T, qk_scale, dropout_p, seed,
                      HEAD_DIM, BLOCK_N, False, DROPOUT, PRECISION)
    dq = _bwd_dq_tile(dq, q, do, lse, delta, K_ptrs, V_ptrs, diag, tl.minimum(diag + BLOCK_M, T),
                      stride_kt, stride_vt, offs_m, offs_d, bh, T, qk_scale, dropout_p, seed,
                      HEAD_DIM, BLOCK_N, True, DROPOUT, PRECISION)
    out = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=ok)


# cache_results: the winning config is kept on disk (TRITON_CACHE_DIR), so a restarted run skips the search and
# gets the same tiles, hence the same numerics, as before it stopped. The disk key includes the configs tried,
# so `pruned` and `full` keep separate winners.
_KEY = ["T", "HEAD_DIM", "DROPOUT"]
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
TUNED = {  # Hopper search spaces (kernels/tuning.py); the interpreter runs INTERPRETER_TILES instead
    "full": {k: triton.autotune(ATTENTION_CONFIGS[k], key=_KEY, cache_results=True)(fn) for k, fn in _KERNELS.items()},
    "pruned": {k: triton.autotune(ATTENTION_CONFIGS[k], key=_KEY, cache_results=True,
                                  prune_configs_by={"early_config_prune": attention_pruner(k)})(fn)
               for k, fn in _KERNELS.items()},
}
_attn_fwd_tuned, _attn_bwd_dkdv_tuned, _attn_bwd_dq_tuned = (TUNED["full"][k] for k in ("fwd", "dkdv", "dq"))
DELTA_BLOCK = {"gpu": 64, "interpreter": 16}  # rows per program of the (untuned) delta kernel
# The interpreter runs programs one by one in numpy: one small fixed (BLOCK_M, BLOCK_N) per kernel. Tests swap
# in unequal tiles, as autotune picks them on a GPU, to check the diagonal bookkeeping.
INTERPRETER_TILES = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"causal_attention: q, k, v must share one (B, H, T, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (problem := head_dim_problem(q.shape[-1])) is not None:
        raise ValueError(f"causal_attention: head dim D={q.shape[-1]} {problem}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"causal_attention: q, k, v must share one dtype of fp32/fp16/bf16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


def _check_seed(seed: int, caller: str) -> int:
    if (problem := seed_problem(seed)) is not None:
        raise ValueError(f"{caller}: seed={seed} {problem}")
    return seed


def forward_args(q, k, v, o, lse, softmax_scale: float, dropout_p: float, seed: int) -> tuple:
    """The forward kernel's runtime arguments (one place: the launcher and kernels.compile_check use it)."""
    H, T = q.shape[1], q.shape[2]
    return (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T, softmax_scale * LOG2E, dropout_p, seed)


def backward_args(q, k, v, do, lse, delta, dq, dk, dv, softmax_scale: float, dropout_p: float,
                  seed: int) -> tuple[tuple, tuple]:
    """The dK/dV and dQ kernels' runtime arguments."""
    H, T = q.shape[1], q.shape[2]
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(),
              H, T, softmax_scale, softmax_scale * LOG2E, dropout_p, seed)
    return (q, k, v, do, lse, delta, dk, dv, *common), (q, k, v, do, lse, delta, dq, *common)


def delta_args(o, do, delta) -> tuple:
    """The delta kernel's runtime arguments."""
    return (o, do, delta, *o.stride(), *do.stride(), o.shape[1], o.shape[2])


def kernel_meta(q: torch.Tensor, dropout_p: float) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DROPOUT=dropout_p > 0,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def attention_forward(q, k, v, softmax_scale: float, dropout_p: float, seed: int, tuning: str = "pruned"):
    """Launch the forward kernel: returns O (B, H, T, D) in q's dtype and the base-2 LSE (B, H, T) in fp32."""
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args = forward_args(q, k, v, o, lse, softmax_scale, dropout_p, seed)
    meta = kernel_meta(q, dropout_p)
    if interpreting(q):
        m, n = INTERPRETER_TILES["fwd"]
        _attn_fwd_kernel[(triton.cdiv(T, m), B * H)](*args, **meta, BLOCK_M=m, BLOCK_N=n)
    else:
        TUNED[tuning]["fwd"][lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H)](*args, **meta)
    return o, lse


def attention_backward(do, q, k, v, o, lse, softmax_scale: float, dropout_p: float, seed: int,
                       tuning: str = "pruned"):
    """Launch delta, dK/dV and dQ kernels: returns dq, dk, dv, contiguous, in q's dtype."""
    B, H, T, D = q.shape
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    meta = kernel_meta(q, dropout_p)
    interpret = interpreting(q)
    delta_block = DELTA_BLOCK["interpreter" if interpret else "gpu"]
    _bwd_delta_kernel[(triton.cdiv(T, delta_block), B * H)](
        *delta_args(o, do, delta), HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=delta_block)
    dkdv_args, dq_args = backward_args(q, k, v, do, lse, delta, dq, dk, dv, softmax_scale, dropout_p, seed)
    if interpret:
        m, n = INTERPRETER_TILES["dkdv"]
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, n), B * H)](*dkdv_args, **meta, BLOCK_M=m, BLOCK_N=n)
        m, n = INTERPRETER_TILES["dq"]
        _attn_bwd_dq_kernel[(triton.cdiv(T, m), B * H)](*dq_args, **meta, BLOCK_M=m, BLOCK_N=n)
    else:
        TUNED[tuning]["dkdv"][lambda META: (triton.cdiv(T, META["BLOCK_N"]), B * H)](*dkdv_args, **meta)
        TUNED[tuning]["dq"][lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H)](*dq_args, **meta)
    return dq, dk, dv


def dropout_keep_mask(B: int, H: int, T: int, seed: int, dropout_p: float, device="cpu") -> torch.Tensor:
    """The (B, H, T, T) bool keep-mask the attention kernels draw for this seed and p (True = kept)."""
    _check_seed(seed, "dropout_keep_mask")
    keep = torch.empty((B, H, T, T), dtype=torch.bool, device=device)
    block = 64 if interpreting(keep) else 32  # the interpreter is fastest with few, large programs here
    _dropout_mask_kernel[(triton.cdiv(T, block), triton.cdiv(T, block), B * H)](
        keep, T, seed, dropout_p, BLOCK_M=block, BLOCK_N=block)
    return keep


# ----------------------------------------------------------------------------------------------------
# Custom ops (so torch.compile sees opaque, differentiable calls) and the public function
# ----------------------------------------------------------------------------------------------------
def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("megagpt::causal_attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                      dropout_p: float, seed: torch.Tensor | None,
                      tuning: str = "pruned") -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, dropout_p, _seed_value(seed), tuning)


@_attention_fwd_op.register_fake
def _(q, k, v, softmax_scale, dropout_p, seed, tuning="pruned"):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("megagpt::causal_attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, softmax_scale: float, dropout_p: float,
                      seed: torch.Tensor | None,
                      tuning: str = "pruned") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse, softmax_scale, dropout_p, _seed_value(seed), tuning)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, softmax_scale, dropout_p, seed, tuning="pruned"):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, dropout_p, seed, tuning = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.softmax_scale, ctx.dropout_p, ctx.seed, ctx.tuning = softmax_scale, dropout_p, seed, tuning
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.megagpt.causal_attention_bwd(do, q, k, v, o, lse, ctx.softmax_scale, ctx.dropout_p,
                                                        ctx.seed, ctx.tuning)
    return dq, dk, dv, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                     dropout_p: float = 0.0, seed: int | None = None, tuning: str = "pruned") -> torch.Tensor:
    """Causal softmax(q k^T * scale) v over (B, H, T, D) tensors, differentiable in q, k, v.

    Dropout (p = dropout_p) acts on the normalised probabilities, kept ones scaled by 1/(1-p). Without `seed`,
    one is drawn from torch's default generator, so torch.manual_seed makes runs repeatable. `tuning` is the GPU
    autotune search: "pruned" (a few configs per key, a cold start in seconds) or "full" (the wide search).
    """
    _check_qkv(q, k, v)
    check_tuning(tuning)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        seed = _check_seed(int(seed), "causal_attention")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    seed_t = None
    if dropout_p > 0:
        seed_t = torch.randint(0, 2**31 - 1, (1,)) if seed is None else torch.tensor([seed])
    o, _ = torch.ops.megagpt.causal_attention_fwd(q, k, v, scale, float(dropout_p), seed_t, tuning)
    return o
