"""The kernel checks at real sizes on a CUDA GPU, in bf16 (compiled Triton, autotuned), plus torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import kernels
from kernels.reference import causal_attention_reference, dropout_keep_mask, layer_norm_reference

pytestmark = pytest.mark.gpu
FACTOR = 2.0  # bf16/fp16: at most this times torch's own error against the same float64 reference


def run(fn, inputs, dout, dtype, **kw):
    """fn's output and the grads of every tensor input, inputs cast to dtype."""
    leaves = [x.to(dtype).clone().requires_grad_() if x is not None else None for x in inputs]
    out = fn(*leaves, **kw)
    out.backward(dout.to(dtype))
    return [out.detach()] + [x.grad for x in leaves if x is not None]


def attention_inputs(B, H, T, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, T, D, device="cuda", generator=g) for _ in range(4)]


@pytest.mark.parametrize("B,H,T,D", [(4, 8, 1024, 64), (1, 4, 4096, 128), (2, 6, 4096, 64), (3, 4, 1000, 128),
                                     (2, 3, 777, 80), (1, 2, 1, 64)])
def test_bf16_attention_error_at_most_twice_torch_sdpa(B, H, T, D):
    q, k, v, do = attention_inputs(B, H, T, D, seed=T + D)
    ours = run(kernels.causal_attention, (q, k, v), do, torch.bfloat16)
    sdpa = run(F.scaled_dot_product_attention, (q, k, v), do, torch.bfloat16, is_causal=True)
    ref = run(causal_attention_reference, (q, k, v), do, torch.float64)
    for name, a, t, r in zip(["out", "dq", "dk", "dv"], ours, sdpa, ref, strict=True):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, r) <= FACTOR * max(rel_err(t, r), 1e-3), (name, rel_err(a, r), rel_err(t, r))


@pytest.mark.parametrize("B,H,T,D", [(2, 4, 1024, 64), (1, 2, 513, 48)])
def test_fp32_attention_matches_float64_reference(B, H, T, D):
    q, k, v, do = attention_inputs(B, H, T, D, seed=1)
    ours = run(kernels.causal_attention, (q, k, v), do, torch.float32)
    ref = run(causal_attention_reference, (q, k, v), do, torch.float64)
    for a, r in zip(ours, ref, strict=True):
        assert rel_err(a, r) <= 1e-4


def test_bf16_attention_non_contiguous_and_dropout_with_identical_mask():
    B, T, H, D, p, seed = 2, 1024, 8, 64, 0.1, 1234
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    do = torch.randn(B, H, T, D, device="cuda", generator=g)
    keep = dropout_keep_mask(B, H, T, seed, p, device="cuda")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # strided (B, H, T, D) views
    out = kernels.causal_attention(q, k, v, dropout_p=p, seed=seed)
    out.backward(do.to(torch.bfloat16))
    strided = [out.detach(), *(qkv.grad[:, :, i].transpose(1, 2) for i in range(3))]
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    dense = run(kernels.causal_attention, (q, k, v), do, torch.bfloat16, dropout_p=p, seed=seed)
    ref = run(causal_attention_reference, (q, k, v), do, torch.float64, dropout_mask=keep, dropout_p=p)
    plain = run(causal_attention_reference, (q, k, v), do, torch.bfloat16, dropout_mask=keep, dropout_p=p)
    for a, b, r, t in zip(strided, dense, ref, plain, strict=True):
        torch.testing.assert_close(a, b)  # same kernels and maths: only the strides differ
        assert rel_err(a, r) <= FACTOR * max(rel_err(t, r), 1e-3)


@pytest.mark.parametrize("shape,affine", [((8, 1024, 768), True), ((4096, 16384), True), ((512, 1000), False),
                                          ((16, 128, 5120), True)])
def test_bf16_layer_norm_error_at_most_twice_torch(shape, affine):
    C = shape[-1]
    g = torch.Generator(device="cuda").manual_seed(C)
    x = torch.randn(shape, device="cuda", generator=g) * 2 + 0.5
    w, b = (torch.randn(C, device="cuda", generator=g) if affine else None for _ in range(2))
    dy = torch.randn(shape, device="cuda", generator=g)
    ours = run(kernels.layer_norm, (x, w, b), dy, torch.bfloat16)
    theirs = run(lambda x, w, b: F.layer_norm(x, (C,), w, b), (x, w, b), dy, torch.bfloat16)
    ref = run(layer_norm_reference, (x, w, b), dy, torch.float64)
    for a, t, r in zip(ours, theirs, ref, strict=True):
        assert rel_err(a, r) <= FACTOR * max(rel_err(t, r), 1e-3), (rel_err(a, r), rel_err(t, r))


def test_torch_compile_of_a_block_using_both_ops():
    B, T, H, D = 2, 512, 4, 64
    C = H * D
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(B, T, C, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(C, device="cuda", generator=g, dtype=torch.bfloat16)
    proj = torch.randn(C, 3 * C, device="cuda", generator=g, dtype=torch.bfloat16) / math.sqrt(C)

    def block(x, w, proj, attention, norm):
        q, k, v = (norm(x, w) @ proj).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        return x + attention(q, k, v).transpose(1, 2).reshape(B, T, C)

    ops = dict(attention=kernels.causal_attention, norm=lambda x, w: kernels.layer_norm(x, w, None))
    reference = dict(attention=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     norm=lambda x, w: F.layer_norm(x, (C,), w))
    compiled = torch.compile(lambda x, w, proj: block(x, w, proj, **ops), fullgraph=True)
    results = []
    for fn in (compiled, lambda x, w, proj: block(x, w, proj, **ops), lambda x, w, proj: block(x, w, proj,
                                                                                              **reference)):
        leaves = [t.clone().requires_grad_() for t in (x, w, proj)]
        out = fn(*leaves)
        out.float().square().mean().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for c, e, r in zip(*results, strict=True):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-2)  # compiled vs eager: same kernels, fused glue
        assert rel_err(c, r.double()) <= 2e-2
