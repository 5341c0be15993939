"""Sampling filters: top-k and top-p keep exactly the tokens they promise."""

import torch

from megagpt.generate import filter_logits


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
