"""Triton LayerNorm against a float64 reference (under the interpreter on CPU): values, grads, shapes, ops."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import kernels
from kernels.reference import layer_norm_reference

FP32_TOL = 1e-4
FP16_FACTOR = 2.0  # fp16: at most this times F.layer_norm's own fp16 error against the same reference


def make_inputs(shape, has_weight, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + 0.5  # a non-zero mean, so centring matters
    w = torch.randn(C, generator=g) if has_weight else None
    b = torch.randn(C, generator=g) if has_bias else None
    dy = torch.randn(shape, generator=g)
    return x, w, b, dy


def run(fn, x, w, b, dy, dtype):
    """fn's output and the grads of x, weight, bias (the ones that exist), all inputs cast to dtype."""
    leaves = [t.to(dtype).clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def torch_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


CASES = [((4, 1000), True, True), ((2, 3, 1023), True, False), ((5, 1), True, True),
         ((3, 7, 64), False, False), ((2, 16384), True, True), ((33, 96), False, True)]


@pytest.mark.parametrize("shape,has_weight,has_bias", CASES)
def test_fp32_output_and_grads_match_float64_reference(shape, has_weight, has_bias):
    x, w, b, dy = make_inputs(shape, has_weight, has_bias, seed=shape[-1])
    ours = run(kernels.layer_norm, x, w, b, dy, torch.float32)
    ref = run(layer_norm_reference, x, w, b, dy, torch.float64)
    assert len(ours) == 2 + has_weight + has_bias
    for a, r in zip(ours, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert rel_err(a, r) <= FP32_TOL, rel_err(a, r)


@pytest.mark.parametrize("shape,has_weight,has_bias", [((4, 1000), True, True), ((2, 3, 1023), False, True),
                                                       ((6, 128), True, False)])
def test_fp16_error_at_most_twice_torch_layer_norm(shape, has_weight, has_bias):
    x, w, b, dy = make_inputs(shape, has_weight, has_bias, seed=1 + shape[-1])
    ours = run(kernels.layer_norm, x, w, b, dy, torch.float16)
    theirs = run(torch_layer_norm, x, w, b, dy, torch.float16)  # torch's CPU fp16 LayerNorm
    ref = run(layer_norm_reference, x, w, b, dy, torch.float64)
    for a, t, r in zip(ours, theirs, ref, strict=True):
        assert a.dtype == torch.float16
        assert rel_err(a, r) <= FP16_FACTOR * rel_err(t, r), (rel_err(a, r), rel_err(t, r))


def test_eps_is_honoured():
    x, w, b, dy = make_inputs((3, 50), True, True, seed=2)
    x = x * 1e-2  # variance comparable to eps
    ours = kernels.layer_norm(x, w, b, eps=1e-3)
    ref = layer_norm_reference(x.double(), w.double(), b.double(), eps=1e-3)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("view", ["column_slice", "transpose"])
def test_non_contiguous_input_gives_the_same_result(view):
    base, w, b, dy = make_inputs((6, 5, 64), True, True, seed=4)
    base.requires_grad_()
    if view == "column_slice":  # rows 64 apart but 40 long: the kernel reads them in place, with a row stride
        x, dy = base[..., :40], dy[..., :40]
        w, b = w[:40], b[:40]
    else:  # (5, 6, 64): not expressible as strided rows, so the launcher copies
        x, dy = base.transpose(0, 1), dy.transpose(0, 1)
    assert not x.is_contiguous()
    y = kernels.layer_norm(x, w, b)
    y.backward(dy)
    dx = base.grad[..., :40] if view == "column_slice" else base.grad.transpose(0, 1)
    ref = run(layer_norm_reference, x.detach(), w, b, dy, torch.float64)
    assert rel_err(y.detach(), ref[0]) <= FP32_TOL and rel_err(dx, ref[1]) <= FP32_TOL


def test_strided_weight_and_bias_give_the_same_result():
    """Every other element of a (2C,) tensor: the kernels read (C,) parameters with unit stride, so a strided
    view gave silently wrong outputs and gradients."""
    x, w, b, dy = make_inputs((5, 24), True, True, seed=6)
    w_base, b_base = torch.randn(48).requires_grad_(), torch.randn(48).requires_grad_()
    y = kernels.layer_norm(x, w_base[::2], b_base[::2])
    y.backward(dy)
    ref = run(layer_norm_reference, x, w_base[::2].detach(), b_base[::2].detach(), dy, torch.float64)
    assert rel_err(y.detach(), ref[0]) <= FP32_TOL
    assert rel_err(w_base.grad[::2], ref[2]) <= FP32_TOL and rel_err(b_base.grad[::2], ref[3]) <= FP32_TOL
    assert not w_base.grad[1::2].any() and not b_base.grad[1::2].any()


def test_custom_ops_pass_opcheck():
    x, w, b, dy = make_inputs((3, 24), True, True, seed=5)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    torch.library.opcheck(torch.ops.megagpt.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.megagpt.layer_norm_fwd.default, (x, None, None, 1e-5))
    _, mean, rstd = torch.ops.megagpt.layer_norm_fwd(x, w, b, 1e-5)
    args = (dy, x.detach(), w.detach(), b.detach(), mean, rstd)
    torch.library.opcheck(torch.ops.megagpt.layer_norm_bwd.default, args)


def test_mismatched_weight_raises_clear_error():
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.layer_norm(torch.randn(2, 8), torch.ones(7), None)


def test_a_scalar_input_is_a_clear_error_as_in_torch():
    # before, an IndexError from x.shape[-1]; F.layer_norm refuses a 0-dim input too (a RuntimeError)
    x = torch.tensor(2.0)
    with pytest.raises(RuntimeError):
        F.layer_norm(x, (1,), torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match="layer_norm: x is a 0-dim tensor"):
        kernels.layer_norm(x, torch.ones(1), torch.zeros(1))
