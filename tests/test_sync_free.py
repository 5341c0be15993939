"""The training loop reads nothing back from the device between log intervals (ZeRO 0, fp32: DeepSpeed makes no
read of its own in a step there; `megagpt bench syncs` and docs/benchmarks.md give the other stages and dtypes)."""

import torch
from helpers import CPU_CONFIG, tiny_overrides

import megagpt.train as trainer
from benchmarks.syncs import host_reads
from megagpt.config import load_config


def test_only_logged_steps_read_back_from_the_device(shakespeare_dataset, tmp_path, capsys):
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=20, log_interval=10,
                                                 eval_interval=1000, checkpoint_interval=1000, sample_tokens=0))
    counts = host_reads(cfg, tmp_path)
    assert counts["steps"] == 20
    assert counts["step"] == 0, counts  # no read in any step but the logged ones (torch's optimizer aside)
    # each of the 2 logged steps reads loss, gradient norm, skipped count and bad-step run
    assert counts["log"] == 2 * 4, counts
    assert counts["evaluate"] >= 1 and counts["save"] >= 2, counts  # the final evaluation and save read too
    assert capsys.readouterr().out == ""  # `bench syncs` prints its table there: the run's own lines stay out


def test_a_bad_step_is_still_skipped_where_it_happens(shakespeare_dataset, tmp_path, monkeypatch):
    """Without a host read per step, a NaN at step 3 still skips exactly that update (on the device)."""
    from megagpt.model import GPT

    forward, weights = GPT.forward, []

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if targets is not None and self.training:
            weights.append(self.transformer.wte.weight.detach().clone())
            if len(weights) == 3:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=5, log_interval=5,
                                                 eval_interval=1000, checkpoint_interval=1000, sample_tokens=0))
    summary = trainer.train(cfg, tmp_path)
    assert summary.skipped_steps == 1
    assert torch.equal(weights[3], weights[2])  # step 3's update did not happen
    assert not torch.equal(weights[4], weights[3])  # step 4's did
