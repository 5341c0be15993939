"""Triton causal attention against float64 references (interpreter on CPU): values, grads, dropout, ops."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import kernels
from kernels.reference import causal_attention_reference, dropout_keep_mask

FP32_TOL = 1e-4  # relative L2 error against float64
FP16_FACTOR = 2.0  # fp16: at most this times torch's own fp16 SDPA error against the same reference


def make_qkv(B, H, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    return q, k, v, do


def run(fn, q, k, v, do, dtype, **kw):
    """fn's output and (dq, dk, dv) for inputs cast to dtype."""
    leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(do.to(dtype))
    return [out.detach(), *(x.grad for x in leaves)]


def reference64(q, k, v, do, **kw):
    return run(causal_attention_reference, q, k, v, do, torch.float64, **kw)


# Every T and every D of the spec, two of them at B*H = 6.
SHAPES_FP32 = [(1, 1, 1, 16), (2, 3, 7, 128), (1, 2, 64, 48), (3, 2, 65, 64), (1, 1, 129, 16),
               (2, 3, 200, 48), (1, 1, 200, 128)]


@pytest.mark.parametrize("B,H,T,D", SHAPES_FP32)
def test_fp32_output_and_grads_match_float64_reference(B, H, T, D):
    q, k, v, do = make_qkv(B, H, T, D, seed=T * 1000 + D)
    ours = run(kernels.causal_attention, q, k, v, do, torch.float32)
    ref = reference64(q, k, v, do)
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert rel_err(a, r) <= FP32_TOL, (name, rel_err(a, r))


@pytest.mark.parametrize("B,H,T,D", [(2, 3, 65, 64), (1, 2, 129, 48), (1, 1, 200, 128), (1, 2, 7, 16)])
def test_fp16_error_at_most_twice_torch_sdpa(B, H, T, D):
    q, k, v, do = make_qkv(B, H, T, D, seed=T + D)
    ours = run(kernels.causal_attention, q, k, v, do, torch.float16)
    sdpa = run(F.scaled_dot_product_attention, q, k, v, do, torch.float16, is_causal=True)  # torch's CPU fp16
    ref = reference64(q, k, v, do)
    for name, a, t, r in zip(["out", "dq", "dk", "dv"], ours, sdpa, ref, strict=True):
        assert a.dtype == torch.float16
        assert rel_err(a, r) <= FP16_FACTOR * rel_err(t, r), (name, rel_err(a, r), rel_err(t, r))


def test_unequal_tiles_as_autotune_picks_them_on_gpu(monkeypatch):
    """GPU configs have BLOCK_M != BLOCK_N (forward, dQ: M = 2-4 N; dK/dV: N = 2-4 M): other diagonals."""
    monkeypatch.setitem(kernels.attention.INTERPRETER_TILES, "fwd", (64, 16))
    monkeypatch.setitem(kernels.attention.INTERPRETER_TILES, "dkdv", (16, 32))
    monkeypatch.setitem(kernels.attention.INTERPRETER_TILES, "dq", (32, 16))
    q, k, v, do = make_qkv(2, 1, 77, 32, seed=77)
    ours = run(kernels.causal_attention, q, k, v, do, torch.float32, dropout_p=0.2, seed=5)
    ref = reference64(q, k, v, do, dropout_mask=dropout_keep_mask(2, 1, 77, 5, 0.2), dropout_p=0.2)
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, ref, strict=True):
        assert rel_err(a, r) <= FP32_TOL, (name, rel_err(a, r))


def _tuned_tiles(tuned) -> list[tuple[int, int]]:
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tuned.configs})


FWD_TILES = _tuned_tiles(kernels.attention._attn_fwd_tuned)
DKDV_TILES = _tuned_tiles(kernels.attention._attn_bwd_dkdv_tuned)
DQ_TILES = _tuned_tiles(kernels.attention._attn_bwd_dq_tuned)


@pytest.mark.parametrize("i", range(max(len(FWD_TILES), len(DKDV_TILES), len(DQ_TILES))))
def test_every_autotune_tile_shape_is_exact_under_the_interpreter(monkeypatch, i):
    """The GPU's own (BLOCK_M, BLOCK_N) tiles, each kernel cycling through its list, on a T spanning tiles."""
    tiles = {"fwd": FWD_TILES[i % len(FWD_TILES)], "dkdv": DKDV_TILES[i % len(DKDV_TILES)],
             "dq": DQ_TILES[i % len(DQ_TILES)]}
    for kernel, tile in tiles.items():
        monkeypatch.setitem(kernels.attention.INTERPRETER_TILES, kernel, tile)
    q, k, v, do = make_qkv(1, 1, 150, 48, seed=i)
    ours = run(kernels.causal_attention, q, k, v, do, torch.float32, dropout_p=0.1, seed=i)
    ref = reference64(q, k, v, do, dropout_mask=dropout_keep_mask(1, 1, 150, i, 0.1), dropout_p=0.1)
    for name, a, r in zip(["out", "dq", "dk", "dv"], ours, ref, strict=True):
        assert rel_err(a, r) <= FP32_TOL, (name, tiles, rel_err(a, r))


def test_softmax_scale_is_honoured():
    q, k, v, do = make_qkv(1, 2, 33, 32, seed=7)
    ours = run(kernels.causal_attention, q, k, v, do, torch.float32, softmax_scale=0.37)
    ref = reference64(q, k, v, do, softmax_scale=0.37)
    assert all(rel_err(a, r) <= FP32_TOL for a, r in zip(ours, ref, strict=True))


def test_non_contiguous_inputs_give_the_same_results():
    B, T, H, D = 2, 40, 3, 48
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, 3, H, D, generator=g).requires_grad_()  # as a fused projection would give
    do = torch.randn(B, H, T, D, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views into qkv, strided
    assert q.stride() == (T * 3 * H * D, D, 3 * H * D, 1)
    out = kernels.causal_attention(q, k, v)
    out.backward(do.transpose(1, 2).contiguous().transpose(1, 2))  # a strided output gradient too
    strided = [out.detach(), *(qkv.grad[:, :, i].transpose(1, 2) for i in range(3))]
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    dense = run(kernels.causal_attention, q, k, v, do, torch.float32)
    ref = reference64(q, k, v, do)
    for a, b, r in zip(strided, dense, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert rel_err(a, r) <= FP32_TOL


def test_dropout_keeps_one_minus_p_of_the_entries():
    p = 0.3
    keep = dropout_keep_mask(2, 4, 256, seed=1234, dropout_p=p)  # 524k draws
    assert keep.shape == (2, 4, 256, 256) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # per (batch, head) slice, too: offsets must not repeat across slices
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_dropout_draws_are_independent_within_and_across_philox_groups():
    """4 columns share one Philox call: neighbours in a group, across groups and across rows must still be
    independent (a lane drawn twice would keep a pair with probability 1-p instead of (1-p)^2)."""
    p = 0.5
    keep = dropout_keep_mask(2, 4, 256, seed=99, dropout_p=p)
    for shift in (1, 2, 3, 4, 5):  # within a group of 4, and across a group boundary
        both = (keep[..., shift:] & keep[..., :-shift]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.01, (shift, both)
    both_rows = (keep[..., 1:, :] & keep[..., :-1, :]).float().mean().item()
    assert abs(both_rows - (1 - p) ** 2) < 0.01, both_rows
    lanes = keep.reshape(2, 4, 256, 64, 4).float().mean(dim=(0, 1, 2, 3))  # each lane of the 4 alike
    assert torch.all((lanes - (1 - p)).abs() < 0.01), lanes


def test_dropout_same_seed_same_result_different_seed_differs():
    q, k, v, _ = make_qkv(1, 2, 24, 16, seed=5)
    a = kernels.causal_attention(q, k, v, dropout_p=0.2, seed=11)
    b = kernels.causal_attention(q, k, v, dropout_p=0.2, seed=11)
    c = kernels.causal_attention(q, k, v, dropout_p=0.2, seed=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(dropout_keep_mask(1, 2, 24, 11, 0.2), dropout_keep_mask(1, 2, 24, 11, 0.2))


def test_dropout_seed_drawn_from_torch_generator():
    q, k, v, _ = make_qkv(1, 1, 20, 16, seed=6)
    torch.manual_seed(42)
    a = kernels.causal_attention(q, k, v, dropout_p=0.25)
    b = kernels.causal_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(42)
    c = kernels.causal_attention(q, k, v, dropout_p=0.25)
    assert torch.equal(a, c) and not torch.allclose(a, b)


@pytest.mark.parametrize("B,H,T,D", [(1, 2, 65, 32), (2, 3, 17, 16)])
def test_dropout_forward_and_grads_match_reference_with_identical_mask(B, H, T, D):
    p, seed = 0.25, 99
    q, k, v, do = make_qkv(B, H, T, D, seed=T)
    ours = run(kernels.causal_attention, q, k, v, do, torch.float32, dropout_p=p, seed=seed)
    mask = dropout_keep_mask(B, H, T, seed, p)
    ref = reference64(q, k, v, do, dropout_mask=mask, dropout_p=p)
    no_dropout = reference64(q, k, v, do)
    for name, a, r, r0 in zip(["out", "dq", "dk", "dv"], ours, ref, no_dropout, strict=True):
        assert rel_err(a, r) <= FP32_TOL, (name, rel_err(a, r))
        assert rel_err(a, r0) > 1e-2  # the mask really did something


def test_custom_ops_pass_opcheck():
    q, k, v, do = make_qkv(1, 2, 9, 16, seed=8)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    seed = torch.tensor([3])
    torch.library.opcheck(torch.ops.megagpt.causal_attention_fwd.default, (q, k, v, 0.25, 0.0, None))
    torch.library.opcheck(torch.ops.megagpt.causal_attention_fwd.default, (q, k, v, 0.25, 0.1, seed))
    o, lse = torch.ops.megagpt.causal_attention_fwd(q, k, v, 0.25, 0.1, seed)
    torch.library.opcheck(torch.ops.megagpt.causal_attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, 0.25, 0.1, seed))


@pytest.mark.parametrize("shape,message", [((1, 2, 8, 8), "head dim"), ((2, 8, 16), "(B, H, T, D)")])
def test_bad_shapes_raise_clear_errors(shape, message):
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernels.causal_attention(x, x, x)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_a_seed_out_of_range_is_a_clear_error_naming_it(seed):
    # before, 2**63 and above failed in torch.tensor ("Overflow when unpacking long long"), and -1 was taken
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match=rf"causal_attention: seed={seed} out of range \(.*2\*\*63 - 1\)"):
        kernels.causal_attention(q, q, q, dropout_p=0.1, seed=seed)
    with pytest.raises(ValueError, match=rf"dropout_keep_mask: seed={seed} out of range"):
        dropout_keep_mask(1, 1, 4, seed, 0.1)


def test_every_seed_megagpt_accepts_fits_the_kernels():
    from kernels.limits import MAX_SEED
    from megagpt.errors import SEED_MAX

    assert SEED_MAX <= MAX_SEED
    q = torch.randn(1, 1, 4, 16)
    assert kernels.causal_attention(q, q, q, dropout_p=0.1, seed=SEED_MAX).shape == q.shape
