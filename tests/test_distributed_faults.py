"""Faults: a rank killed with SIGKILL ends the job quickly, the run resumes; non-finite steps are skipped (in a run,
and the step guard alone on a fused AdamW)."""

import os
import signal
import time

import pytest
import torch
from dist_helpers import finish, losses, tiny, torchrun, wait_for, worker_pids
from helpers import guarded_adamw, guarded_step, train_records

from megagpt.checkpoint import Checkpointer
from megagpt.config import load_config
from megagpt.distributed import DistInfo
from megagpt.inference import consolidated_state_dict
from megagpt.model import GPT
from megagpt.step_guard import NonFiniteTraining
from megagpt.train import train


@pytest.mark.distributed
def test_kill_9_of_one_rank_ends_the_job_and_the_run_resumes(shakespeare_dataset, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny(shakespeare_dataset, zero_stage=2, max_steps=100_000, checkpoint_interval=5)
    launcher = torchrun(run_dir, overrides)
    wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), 120, "the first checkpoint")
    killed_at = time.monotonic()
    os.kill(worker_pids(launcher)[-1], signal.SIGKILL)
    (code,) = finish(launcher, timeout=150, ok=False)
    took = time.monotonic() - killed_at
    assert code != 0 and took < 120, f"exit {code} after {took:.0f} s"

    latest = Checkpointer(run_dir / "checkpoints", DistInfo(0, 0, 1)).latest_good_tag()
    k = int(latest.removeprefix("step_"))
    finish(torchrun(run_dir, tiny(shakespeare_dataset, zero_stage=2, max_steps=k + 3, checkpoint_interval=5)))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{k + 3:06d}"
    assert {k + 1, k + 2, k + 3} <= set(losses(run_dir))


def poison(monkeypatch, bad_steps: set[int]) -> list[torch.Tensor]:
    """Make the training loss of the given steps +inf (accum 1: one training forward per step).

    Returns the weights each training forward saw, so a test can tell whether an update happened.
    """
    seen, forward = [], GPT.forward

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if self.training and targets is not None:
            seen.append(self.transformer.wte.weight.detach().clone())
            if len(seen) in bad_steps:
                loss = loss + float("inf")  # its gradient is finite: only the loss says something is wrong
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    return seen


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_non_finite_step_is_skipped_and_counted(zero_stage, monkeypatch, shakespeare_dataset, tmp_path):
    seen = poison(monkeypatch, {3})
    train(load_config(None, tiny(shakespeare_dataset, zero_stage=zero_stage, max_steps=6)), tmp_path)
    assert torch.equal(seen[3], seen[2])  # step 3's update was skipped ...
    assert not torch.equal(seen[4], seen[3]) and not torch.equal(seen[2], seen[1])  # ... and only that one
    assert all(torch.isfinite(w).all() for w in seen)
    assert [r["skipped_steps"] for r in train_records(tmp_path)] == [0, 0, 1, 1, 1, 1]


def test_a_non_finite_gradient_with_a_finite_loss_changes_nothing_and_counts_as_bad():
    torch.manual_seed(0)
    w, optimizer, guard = guarded_adamw(torch.randn(4), grad_clip=1.0, max_bad_steps=1)
    guarded_step(w, optimizer, guard, torch.randn(4))
    weights, state = w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}
    guarded_step(w, optimizer, guard, torch.tensor([1.0, float("nan"), 0.0, 2.0]), loss=1.5)
    assert torch.equal(w.detach(), weights)
    assert all(torch.equal(optimizer.state[w][k], v) for k, v in state.items())  # moments and step count too
    assert guard.skipped_steps() == 1
    with pytest.raises(NonFiniteTraining, match="1 non-finite steps in a row"):
        guard.check(2)


def test_only_bad_steps_in_a_row_count_toward_the_stop():
    w, optimizer, guard = guarded_adamw(torch.randn(4), grad_clip=0.0, max_bad_steps=3)
    bad, good = torch.full((4,), float("nan")), torch.ones(4)
    for grad in (bad, bad, good, bad, bad):
        guarded_step(w, optimizer, guard, grad, loss=1.0 if grad is good else float("nan"))
    guard.check(5)  # 2 and 2 bad steps, never 3 in a row
    guarded_step(w, optimizer, guard, bad, loss=float("nan"))
    with pytest.raises(NonFiniteTraining, match="3 non-finite steps in a row"):
        guard.check(6)
    assert guard.skipped_steps() == 5


def test_too_many_bad_steps_in_a_row_stop_without_a_poisoned_checkpoint(monkeypatch, shakespeare_dataset,
                                                                         tmp_path):
    seen = poison(monkeypatch, {4, 5, 6})
    overrides = tiny(shakespeare_dataset, max_steps=20, checkpoint_interval=2) + ["train.max_bad_steps=3"]
    cfg = load_config(None, overrides)
    with pytest.raises(NonFiniteTraining, match="3 non-finite steps in a row .* step 6"):
        train(cfg, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", DistInfo(0, 0, 1))
    assert ckpt.tags()[-1] == "step_000004"  # nothing saved after the stop
    saved = consolidated_state_dict(tmp_path, "step_000004")["transformer.wte.weight"]
    assert torch.equal(saved, seen[3]) and torch.isfinite(saved).all()  # step 4's update never happened
