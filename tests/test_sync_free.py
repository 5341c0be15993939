"""The training loop reads nothing back from the device between log intervals (ZeRO 0, fp32: DeepSpeed makes no
read of its own in a step there; docs/benchmarks.md lists the ones it makes in other stages and dtypes).

Counted: aten::_local_scalar_dense, what .item(), float(t), bool(t) and int(t) of a tensor run. Not counted: those
inside torch's optimizer step, which on a CPU reads its CPU-side step counters (on a GPU, fused AdamW keeps them
on the device)."""

import pytest
import torch
from helpers import CPU_CONFIG, tiny_overrides

import megagpt.train as trainer
from megagpt.config import load_config
from megagpt.stages.pretrain import PretrainStage

SYNC = "aten::_local_scalar_dense"
LABELS = ("step", "log", "save", "evaluate")


def _labelled(monkeypatch, owner, name: str, label: str):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def host_reads(monkeypatch, cfg, run_dir) -> dict[str, int]:
    """Device->host reads during the loop, by where they happened: in a logged step, a checkpoint, elsewhere."""
    _labelled(monkeypatch, PretrainStage, "train_step", "megagpt.step")
    _labelled(monkeypatch, trainer, "_log_train", "megagpt.log")
    _labelled(monkeypatch, trainer.Run, "save", "megagpt.save")
    _labelled(monkeypatch, trainer, "_evaluate", "megagpt.evaluate")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train(cfg, run_dir)
    events = prof.events()
    spans = {label: [e.time_range for e in events if e.name == f"megagpt.{label}"] for label in LABELS}
    loop_start = min(r.start for r in spans["step"])
    counts = {"steps": len(spans["step"]), **dict.fromkeys(LABELS[1:], 0), "elsewhere": 0}
    for e in (e for e in events if e.name == SYNC and e.time_range.start >= loop_start and not _in_optimizer(e)):
        where = next((k for k in LABELS[1:] if any(r.start <= e.time_range.start <= r.end for r in spans[k])),
                     "elsewhere")
        counts[where] += 1
    return counts


def _in_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step#"):
            return True
        parent = parent.cpu_parent
    return False


def test_only_logged_steps_read_back_from_the_device(shakespeare_dataset, tmp_path, monkeypatch):
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=20, log_interval=10,
                                                 eval_interval=1000, checkpoint_interval=1000, sample_tokens=0))
    counts = host_reads(monkeypatch, cfg, tmp_path)
    assert counts["steps"] == 20
    assert counts["elsewhere"] == 0, counts  # the 18 steps that are not logged read nothing back
    # each of the 2 logged steps reads loss, gradient norm, skipped count and bad-step run
    assert counts["log"] == 2 * 4, counts
    assert counts["evaluate"] >= 1 and counts["save"] >= 2, counts  # the final evaluation and save read too


@pytest.mark.parametrize("poisoned_step", [3])
def test_a_bad_step_is_still_skipped_where_it_happens(shakespeare_dataset, tmp_path, monkeypatch, poisoned_step):
    """Without a host read per step, a NaN at step 3 still skips exactly that update (on the device)."""
    from megagpt.model import GPT

    forward, calls = GPT.forward, []

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if targets is not None and self.training:
            calls.append(self.transformer.wte.weight.detach().clone())
            if len(calls) == poisoned_step:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=5, log_interval=5,
                                                 eval_interval=1000, checkpoint_interval=1000, sample_tokens=0))
    summary = trainer.train(cfg, tmp_path)
    assert summary.skipped_steps == 1
    assert torch.equal(calls[poisoned_step], calls[poisoned_step - 1])  # that update did not happen
    assert not torch.equal(calls[poisoned_step + 1], calls[poisoned_step])  # the next one did
