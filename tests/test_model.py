"""The GPT model: size, causality, backend equivalence, KV-cache generation, activation checkpointing."""

import pytest
import torch

from megagpt.config import load_config
from megagpt.generate import generate
from megagpt.model import CPU_LOW_PRECISION_SPELLED_OUT_MAX_T, GPT, KVCache, _math_attention, _sdpa_attention

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_cfg(**model):
    base = {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 16,
        "vocab_size": 50,
        "dropout": 0.0,
        "bias": True,
    }
    base.update(model)
    return load_config(None, [f"model.{k}={v}" for k, v in base.items()]).model


def test_shakespeare_char_has_10_65m_parameters():
    cfg = load_config(ROOT / "configs" / "shakespeare_char.yaml", ["model.vocab_size=65"])
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert round(model.num_params() / 1e6, 2) == 10.65
    # and by hand: 6 blocks of 12·d² (no biases) + 2 LayerNorm weights of d each, final LN, tied wte
    d = 384
    assert model.num_params() == 6 * (12 * d * d + 2 * d) + d + 65 * d


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_changing_a_future_token_never_changes_past_logits(attention):
    torch.manual_seed(0)
    model = GPT(tiny_cfg(attention=attention)).eval()
    idx = torch.randint(0, 50, (2, 16))
    for t in [0, 5, 14]:
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
        a, _ = model(idx)
        b, _ = model(changed)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bias", [True, False])
def test_math_and_sdpa_give_the_same_logits_and_gradients(bias):
    torch.manual_seed(1)
    math_model = GPT(tiny_cfg(attention="math", bias=bias))
    sdpa_model = GPT(tiny_cfg(attention="sdpa", bias=bias))
    sdpa_model.load_state_dict(math_model.state_dict())
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    la, loss_a = math_model(idx, targets)
    lb, loss_b = sdpa_model(idx, targets)
    loss_a.backward()
    loss_b.backward()
    assert _rel(la, lb) <= 1e-5
    for (name, pa), pb in zip(math_model.named_parameters(), sdpa_model.parameters(), strict=True):
        assert _rel(pa.grad, pb.grad) <= 1e-5, name



def _attention_f64(q, k, v):
    """Causal softmax(q·kᵀ/√d)·v in float64, written out: the reference for the bf16 paths."""
    q, k, v = (t.double() for t in (q, k, v))
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def _output_and_grads(attend, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


def _sdpa_backend(q, k, v):
    return _sdpa_attention(q, k, v, dropout_p=0.0)


def _spelled_out(q, k, v):
    return _math_attention(q, k, v, dropout_p=0.0)


def _torch_sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("T, path", [(64, _spelled_out), (CPU_LOW_PRECISION_SPELLED_OUT_MAX_T + 1, _torch_sdpa)])
def test_sdpa_in_bf16_on_a_cpu_is_the_spelled_out_attention_at_short_contexts(T, path):
    # torch's CPU flash kernel is slow in bf16 at short T (docs/benchmarks.md), so `sdpa` runs the spelled-out
    # attention there (its softmax in fp32), and torch's kernel from CPU_LOW_PRECISION_SPELLED_OUT_MAX_T on
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(2, 2, T, 16, dtype=torch.bfloat16) for _ in range(4))
    got = _output_and_grads(_sdpa_backend, q, k, v, g)
    assert all(torch.equal(a, b) for a, b in zip(got, _output_and_grads(path, q, k, v, g), strict=True))
    want = _output_and_grads(_attention_f64, q, k, v, g.double())
    for a, b in zip(got, want, strict=True):  # within about one bf16 step (2**-7) of the largest exact value
        assert (a.double() - b).abs().max() <= 0.01 * b.abs().max()


def test_sdpa_in_fp32_on_a_cpu_is_torchs_kernel():
    q, k, v = (torch.randn(2, 2, 64, 16) for _ in range(3))
    assert torch.equal(_sdpa_backend(q, k, v), _torch_sdpa(q, k, v))

def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(2)
    cfg = tiny_cfg(n_layer=8, n_embd=256, n_head=4)
    model = GPT(cfg)
    proj = model.transformer.h[0].attn.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / (2 * 8) ** 0.5) < 0.0005
    assert model.lm_head.weight is model.transformer.wte.weight


def test_kv_cache_forward_matches_full_forward():
    torch.manual_seed(3)
    model = GPT(tiny_cfg()).eval()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.cfg.n_layer)
    pieces = [
        model(idx[:, :5], cache=cache)[0],
        model(idx[:, 5:6], cache=cache)[0],
        model(idx[:, 6:], cache=cache)[0],
    ]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("new_tokens", [6, 30])  # within block_size, and well past it (window slides)
def test_generation_with_cache_equals_generation_without(new_tokens):
    torch.manual_seed(4)
    model = GPT(tiny_cfg())
    prompt = torch.randint(0, 50, (2, 3))
    runs = [
        generate(
            model,
            prompt,
            new_tokens,
            temperature=1.0,
            top_k=20,
            generator=torch.Generator().manual_seed(7),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (2, 3 + new_tokens)
    assert torch.equal(runs[0], runs[1])


def test_activation_checkpointing_gives_equal_gradients():
    torch.manual_seed(5)
    plain, ckpt = GPT(tiny_cfg()), GPT(tiny_cfg(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    plain(idx, targets)[1].backward()
    ckpt(idx, targets)[1].backward()
    for pa, pb in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-5)


def test_flops_per_token_follows_palm_accounting():
    model = GPT(tiny_cfg())
    c = model.cfg
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.block_size * c.n_embd
