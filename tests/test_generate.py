"""Sampling filters: top-k and top-p keep exactly the tokens they promise."""

import pytest
import torch

from megagpt.generate import filter_logits, sampling_probabilities


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(4, 100)
    kept = filter_logits(logits, top_k=7, top_p=None).isfinite()
    assert kept.sum(dim=-1).tolist() == [7] * 4
    assert torch.equal(kept, logits >= logits.topk(7).values[:, -1:])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.randn(3, 50)
    kept = filter_logits(logits, top_k=None, top_p=0.6).isfinite()
    probs = logits.softmax(-1)
    for row in range(3):
        order = probs[row].argsort(descending=True)
        need = int((probs[row][order].cumsum(0) < 0.6).sum()) + 1  # first index where the mass reaches p
        assert set(order[:need].tolist()) == set(kept[row].nonzero().flatten().tolist())


def _reference_probabilities(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """Float64, one row: softmax(logits / T), then the nucleus of that tempered distribution, renormalised."""
    import math

    weights = [math.exp(v / temperature) for v in logits]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return [p / mass if i in kept else 0.0 for i, p in enumerate(probs)]


def test_sampling_divides_by_the_temperature_then_keeps_the_nucleus_of_the_tempered_distribution():
    """The nucleus is taken of softmax(logits / T), not of the untempered logits: at T = 0.5 and T = 2 the kept sets
    differ from T = 1's (checked), so a filter applied before the temperature, or a wrong power of T, fails."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    sizes = set()
    for temperature in (0.5, 1.0, 2.0):
        got = sampling_probabilities(logits, temperature, top_k=None, top_p=0.8)
        want = _reference_probabilities(logits[0].tolist(), temperature, 0.8)
        assert got[0].double().tolist() == pytest.approx(want, abs=1e-6), temperature
        sizes.add(sum(p > 0 for p in want))
    assert len(sizes) == 3  # the temperature changes which tokens are kept


def test_a_long_sample_shows_a_bar_on_a_terminal_only_and_samples_the_same(monkeypatch):
    import io
    import sys

    from megagpt.config import ModelConfig
    from megagpt.generate import generate
    from megagpt.model import GPT

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    outs, shown = [], []
    for progress, stderr in ((False, Terminal()), (True, Terminal()), (True, io.StringIO())):
        monkeypatch.setattr(sys, "stderr", stderr)
        idx = torch.zeros(1, 1, dtype=torch.long)
        outs.append(generate(model, idx, 12, generator=torch.Generator().manual_seed(3), progress=progress))
        shown.append(stderr.getvalue())
    assert all(torch.equal(out, outs[0]) for out in outs) and outs[0].shape == (1, 13)
    assert shown[0] == "" and "sample:" in shown[1] and "/12 " in shown[1] and shown[2] == ""  # a pipe: no bar



def test_a_temperature_near_zero_samples_the_likeliest_tokens_not_nan():
    """logits / 1e-40 overflowed float32 to inf (and below ~1e-45 the temperature itself rounded to 0): softmax
    gave NaN and torch.multinomial raised. Near 0 the tokens are the greedy ones, with or without top-k/top-p."""
    from megagpt.config import ModelConfig
    from megagpt.generate import generate
    from megagpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # confident logits, as a trained model's: |logit| / 1e-40 > float32's max
    idx = torch.zeros(2, 1, dtype=torch.long)
    greedy = generate(model, idx, 6, temperature=0)
    for temperature, top_k, top_p in ((1e-40, None, None), (1e-46, 3, None), (1e-300, None, 0.9)):
        out = generate(model, idx, 6, temperature, top_k, top_p, torch.Generator().manual_seed(1))
        assert torch.equal(out, greedy), (temperature, top_k, top_p)
