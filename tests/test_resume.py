"""Resume for real on 2 ranks: exact after a stop and a SIGTERM (dropout on), elastic onto 1 and 3 ranks."""

import os
import signal

import pytest
import torch
from dist_helpers import (
    BASE_CONFIG,
    client_state,
    finish,
    losses,
    metrics,
    single,
    tiny,
    torchrun,
    wait_for,
    worker_pids,
)

from megagpt.config import load_config
from megagpt.train import train

pytestmark = pytest.mark.distributed
LONG = 150  # steps of the uninterrupted reference; lr_decay_steps is fixed, so max_steps does not move the LR


def exact_overrides(dataset, **train):
    return tiny(dataset, zero_stage=1, model_dropout=0.1, **train)


def adam_state(run_dir, tag):
    """The torch Adam state_dict rank 0 saved in a tag (ZeRO 1/2 and ZeRO 3 nest it under different keys)."""
    path = sorted((run_dir / "checkpoints" / tag).glob("*optim_states.pt"))[0]
    zero = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return zero.get("base_optimizer_state") or zero["optimizer_state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(shakespeare_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    finish(torchrun(run_dir, exact_overrides(shakespeare_dataset, max_steps=LONG)))
    return losses(run_dir)


def test_stop_at_max_steps_then_sigterm_on_one_rank_then_resume_give_bit_identical_losses(
        uninterrupted, shakespeare_dataset, tmp_path, capfd):
    """One run stopped twice, each time resumed: at its max_steps (5), then by SIGTERM to one of its ranks, which saves
    and exits 0; its losses are the uninterrupted run's, bit for bit. (One chain of 2-rank launches: each resume is
    a launch, so the two stops share the run between them.)"""
    run_dir = tmp_path / "run"
    finish(torchrun(run_dir, exact_overrides(shakespeare_dataset, max_steps=5)))
    launcher = torchrun(run_dir, exact_overrides(shakespeare_dataset, max_steps=LONG))  # resumes at step 5
    wait_for(lambda: len(losses(run_dir)) >= 8, 120, "step 8")
    os.kill(worker_pids(launcher)[-1], signal.SIGTERM)  # one rank only: every rank must stop together
    assert finish(launcher) == [0]
    k = max(losses(run_dir))
    assert k < LONG, "the run finished before the signal arrived"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{k:06d}"
    assert "stop requested" in launcher.log_path.read_text()

    end = min(k + 6, LONG)
    finish(torchrun(run_dir, exact_overrides(shakespeare_dataset, max_steps=end)))
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, end + 1))  # appended, no repeats
    assert losses(run_dir) == {step: uninterrupted[step] for step in range(1, end + 1)}  # bit-identical, fp32
    # Finished, then started again on 1 rank: said to be complete, nothing written (before, the ZeRO partitions
    # were first converted for 1 rank into step_NNNNNN_universal; a 1-rank run on 2 ranks got the global batch's
    # refusal instead). In this process: what is checked comes before any engine is built.
    before = sorted(run_dir.rglob("*"))
    capfd.readouterr()
    train(load_config(BASE_CONFIG, exact_overrides(shakespeare_dataset, max_steps=end)), run_dir)
    assert f"{run_dir} is complete: step_{end:06d} is at train.max_steps ({end})" in capfd.readouterr().err
    assert sorted(run_dir.rglob("*")) == before


# ZeRO 2 only, as this test is 35-45 s of CI a stage. ZeRO 1 runs through the same optimizer
# (DeepSpeedZeroOptimizer), checkpoint layout and universal conversion. ZeRO 3's elastic resume (2 -> 1 ranks
# through a universal checkpoint, with megagpt.universal's repair) is test_mup.py's
# test_zero3_elastic_resume_keeps_the_per_group_lr: losses within 1e-5 of the 2-rank run, each group's own
# hyperparameters (without the repair it fails: a 2.5% loss drift, checked).
@pytest.mark.parametrize("zero_stage", [2])
def test_resume_on_three_then_one_rank_continues_the_same_run(zero_stage, shakespeare_dataset, tmp_path):
    """Saved on 2 ranks (accum 3), resumed on 3 (accum 2) via a universal checkpoint, then on 1 (accum 6). The
    resumes leave train.global_batch_tokens unset, as the Shakespeare configs do: the saved global batch is
    kept, and said (before, the step silently shrank with the ranks)."""
    def overrides(max_steps, **fixed):
        return tiny(shakespeare_dataset, zero_stage=zero_stage, micro_batch_size=4, max_steps=max_steps,
                    checkpoint_interval=4, keep_checkpoints=10, **fixed)

    reference, elastic = tmp_path / "two_ranks", tmp_path / "elastic"
    finish(torchrun(reference, overrides(8, global_batch_tokens=4 * 32 * 6), 2))
    expected = losses(reference)

    start = reference / "checkpoints" / "step_000004"
    three = torchrun(elastic, overrides(6), 3, "--resume", str(start))
    finish(three)
    said = "the global batch stays at 768 tokens, as {} was trained with: train.global_batch_tokens=768"
    assert said.format("step_000004") in three.log_path.read_text()
    # converted into this run's own checkpoints/, which this job locks, not into the other run dir (where its own
    # job may be pruning, or another resume converting the same tag); pruned at this run's first save
    assert not (reference / "checkpoints" / "step_000004_universal").exists()
    assert f"converting it to a universal checkpoint in {elastic / 'checkpoints' / 'step_000004_universal'}" in \
        three.log_path.read_text()
    assert sorted(p.name for p in (elastic / "checkpoints").glob("step_*")) == ["step_000006"]
    one_rank = single(elastic, overrides(8))  # auto: step_000006 from 3 ranks, converted again
    finish(one_rank)
    assert (elastic / "checkpoints" / "step_000006_universal" / "zero").is_dir()
    log = one_rank.log_path.read_text()
    assert said.format("step_000006") in log
    assert "resumed from step_000006 (saved on 3 ranks, loaded on 1 rank via step_000006_universal)" in log
    assert "MPU is not provided" not in log  # DeepSpeed's notice, true of every run

    got = losses(elastic)
    assert sorted(got) == [5, 6, 7, 8]
    assert got[5] == pytest.approx(expected[4], rel=0.02)  # the run continues where it stopped
    # The same samples and the same updates: equal up to summation order (measured <= 2.4e-7 on every stage).
    # ZeRO 3 drifted 2.4e-3 by step 7 until megagpt.universal.repair_zero3_universal_load: DeepSpeed's ZeRO-3
    # universal loader shares one Adam step tensor between param groups and gives all groups group 0's
    # weight decay (docs/distributed.md, "Resume").
    for step in (5, 6, 7, 8):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    assert [r["tokens_seen"] for r in metrics(elastic) if "loss" in r] == [768 * step for step in range(5, 9)]
    for tag, step in (("step_000006", 6), ("step_000008", 8)):  # Adam's own state, after each conversion
        adam = adam_state(elastic, tag)
        assert [float(s["step"]) for s in adam["state"].values()] == [step, step], tag  # one count per group
        assert [g["weight_decay"] for g in adam["param_groups"]] == [0.1, 0.0], tag  # decay, no-decay group
    # The data stream went on from the global position, no sample twice: 24 windows a step, 8 steps.
    loader = client_state(elastic, "step_000008")["loader"]
    assert loader["windows_consumed"] == 8 * 24 and loader["world_size"] == 1
    assert client_state(elastic, "step_000006")["loader"]["windows_consumed"] == 6 * 24


@pytest.mark.parametrize("saved, now, fixed, kept", [
    ({"world_size": 2}, 1, None, 256), ({"world_size": 4}, 2, None, 512),  # a manifest before 2026-11-30
    ({"world_size": 2}, 2, None, None), ({"world_size": 2}, 4, 512, None),  # same ranks; a fixed global batch
    ({"world_size": 1}, 2, None, "refused"),  # 2 ranks of 128 tokens cannot make up 128
    ({"world_size": 1, "train": {"micro_batch_size": 4, "global_batch_tokens": 256}}, 1, None, 256),  # 2 -> 1 -> 1
    ({"world_size": 1, "train": {"micro_batch_size": 8, "global_batch_tokens": 256}}, 1, None, None),  # new micro
])
def test_the_kept_global_batch_is_the_saved_one_or_a_refusal_naming_the_way_out(saved, now, fixed, kept,
                                                                                shakespeare_dataset):
    from megagpt.config import ConfigError, load_config
    from megagpt.train import _kept_global_batch

    cfg = load_config(None, tiny(shakespeare_dataset, micro_batch_size=4, global_batch_tokens=fixed or "null"))
    if kept == "refused":  # block 32: 128 tokens a rank
        with pytest.raises(ConfigError, match=r"step_000004 was trained with a global batch of 128 tokens, which 2 "
                           r"ranks of micro_batch_size × block_size = 128 cannot make up: set "
                           r"train.micro_batch_size so that they can, or --set train.global_batch_tokens=N"):
            _kept_global_batch(cfg, saved, "step_000004", now)
    else:
        assert _kept_global_batch(cfg, saved, "step_000004", now) == kept
