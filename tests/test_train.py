"""The trainer end to end on one process: loss falls, exact resume, TensorBoard, run dir, sampling."""

import json

import pytest
import torch
from helpers import CPU_CONFIG, metrics, tiny_overrides, train_records

from megagpt import metrics as metrics_module
from megagpt.config import ConfigError, load_config
from megagpt.errors import UserError
from megagpt.lr_schedule import lr_at
from megagpt.metrics import RunLogger
from megagpt.sample import sample_texts
from megagpt.train import eval_line, train

read_metrics = metrics


@pytest.fixture(scope="module")
def trained_run(shakespeare_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(
        CPU_CONFIG,
        tiny_overrides(
            shakespeare_dataset,
            max_steps=200,
            eval_interval=100,
            checkpoint_interval=100,
            lr=3e-3,
            micro_batch_size=16,
        ),
    )
    state = train(cfg, run_dir)
    return run_dir, state


def test_a_tiny_run_learns(trained_run):
    run_dir, state = trained_run
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 200
    assert losses[0] > 3.9  # ≈ ln(65) at initialisation
    # below the unigram entropy of Shakespeare's characters (≈3.3 nats): it uses context, not just letter counts
    assert sum(losses[-10:]) / 10 < 2.9
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]


def test_the_run_dir_holds_config_checkpoints_samples_and_tokenizer(trained_run):
    run_dir, _ = trained_run
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.model.vocab_size == 65 and resolved.train.max_steps == 200
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000200"
    assert {p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()} == {
        "step_000100",
        "step_000200",
    }
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000100.txt", "step_000200.txt"]
    assert (run_dir / "tokenizer" / "manifest.json").is_file()


def test_tensorboard_has_the_scalar_tags(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained_run
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/loss"} <= scalars
    assert len(events.Scalars("train/loss")) == 200
    assert [e.step for e in events.Scalars("val/loss")] == [100, 200]
    first_lr = events.Scalars("train/lr")[0].value
    assert first_lr == pytest.approx(lr_at(0, load_config(run_dir / "config.yaml").train), rel=1e-6)


def test_sampling_with_a_seed_is_reproducible(trained_run):
    run_dir, _ = trained_run
    a = sample_texts(run_dir, "ROMEO:", 40, num_samples=2, seed=3)
    b = sample_texts(run_dir, "ROMEO:", 40, num_samples=2, seed=3)
    c = sample_texts(run_dir, "ROMEO:", 40, num_samples=2, seed=4)
    assert a == b and a != c
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 40 for t in a)
    no_cache = sample_texts(run_dir, "ROMEO:", 40, num_samples=2, seed=3, use_cache=False)
    assert no_cache == a


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: what train.dtype auto picks on a CPU with native bf16
def test_resume_continues_identical_losses(dtype, shakespeare_dataset, tmp_path):
    """Stopped at step 12 and resumed: step 13 onwards equals the uninterrupted run bit for bit."""
    common = tiny_overrides(
        shakespeare_dataset,
        checkpoint_interval=12,
        lr_decay_steps=24,
        max_steps=24,
        sample_tokens=0,
        eval_interval=100,
        dtype=dtype,
    )
    train(load_config(CPU_CONFIG, common), tmp_path / "whole")
    assert load_config(tmp_path / "whole" / "config.yaml").train.dtype == dtype  # trained in it, not fp32 anyway
    stopped = train(load_config(CPU_CONFIG, [*common, "train.max_steps=12"]), tmp_path / "split")
    assert stopped.step == 12
    resumed = train(load_config(CPU_CONFIG, common), tmp_path / "split")
    assert resumed.resumed_from == "step_000012"
    logged = train_records(tmp_path / "split")[12:]
    assert logged[0]["step"] == 13
    reference = {r["step"]: r for r in train_records(tmp_path / "whole")}
    for r in logged:
        assert r["loss"] == reference[r["step"]]["loss"]
        assert r["lr"] == reference[r["step"]]["lr"]
    split_metrics = [r["step"] for r in read_metrics(tmp_path / "split") if "loss" in r]
    assert split_metrics == list(range(1, 25))  # the resumed run appended


def test_dtype_auto_is_decided_once_per_run(shakespeare_dataset, tmp_path, monkeypatch):
    """auto: fp32 without native bf16, bf16 with it; a resumed run keeps its checkpoint's dtype either way."""
    from megagpt import hardware

    common = tiny_overrides(shakespeare_dataset, max_steps=2, sample_tokens=0, eval_interval=100, dtype="auto")
    monkeypatch.setattr(hardware, "native_bf16", lambda: False)
    train(load_config(CPU_CONFIG, common), tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.yaml").train.dtype == "fp32"
    monkeypatch.setattr(hardware, "native_bf16", lambda: True)  # the same run on a machine with native bf16
    resumed = train(load_config(CPU_CONFIG, [*common, "train.max_steps=4"]), tmp_path / "run")
    assert resumed.resumed_from == "step_000002" and resumed.step == 4
    assert load_config(tmp_path / "run" / "config.yaml").train.dtype == "fp32"
    elsewhere = train(load_config(CPU_CONFIG, [*common, "train.max_steps=4"]), tmp_path / "branch",
                      resume=str(tmp_path / "run" / "checkpoints" / "step_000002"))  # --resume PATH: another run dir
    assert elsewhere.step == 4 and load_config(tmp_path / "branch" / "config.yaml").train.dtype == "fp32"
    train(load_config(CPU_CONFIG, common), tmp_path / "new")  # a new run there
    assert load_config(tmp_path / "new" / "config.yaml").train.dtype == "bf16"
    manifest = json.loads((tmp_path / "new" / "checkpoints" / "step_000002" / "megagpt_manifest.json").read_text())
    assert manifest["train"] == {"dtype": "bf16", "micro_batch_size": 8, "global_batch_tokens": 8 * 32}  # 1 rank
    with pytest.raises(ConfigError, match="train.dtype='fp32' but checkpoint step_000002 was trained in 'bf16'"):
        train(load_config(CPU_CONFIG, [*common, "train.dtype=fp32", "train.max_steps=4"]), tmp_path / "new")


def test_resuming_into_a_different_model_shape_is_a_clear_error(shakespeare_dataset, tmp_path):
    common = tiny_overrides(shakespeare_dataset, max_steps=2, sample_tokens=0)
    train(load_config(CPU_CONFIG, common), tmp_path)
    with pytest.raises(ConfigError, match="model.n_embd=64"):
        train(load_config(CPU_CONFIG, [*common, "model.n_embd=64", "train.max_steps=4"]), tmp_path)


def test_a_missing_dataset_names_the_directory(tmp_path):
    cfg = load_config(CPU_CONFIG, [f"data.dataset_dir={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="nope"):
        train(cfg, tmp_path / "run")


def test_loss_is_averaged_over_micro_batches_like_one_big_batch(shakespeare_dataset, tmp_path):
    """grad_accum 2 × micro 4 takes the same step as micro 8 (fp32, same windows)."""
    train(
        load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=3, sample_tokens=0, micro_batch_size=8)),
        tmp_path / "a",
    )
    train(
        load_config(
            CPU_CONFIG,
            tiny_overrides(shakespeare_dataset, max_steps=3, sample_tokens=0, micro_batch_size=4, grad_accum_steps=2),
        ),
        tmp_path / "b",
    )
    for x, y in zip(
        [r["loss"] for r in train_records(tmp_path / "a")], [r["loss"] for r in train_records(tmp_path / "b")],
        strict=True,
    ):
        assert x == pytest.approx(y, rel=1e-5)


def test_mfu_is_logged_from_a_configured_peak_and_left_out_without_one(shakespeare_dataset, tmp_path):
    from megagpt.model import GPT

    peak = 1e12
    cfg = load_config(
        CPU_CONFIG,
        [*tiny_overrides(shakespeare_dataset, max_steps=3, sample_tokens=0), f"logging.peak_flops={peak}"],
    )
    train(cfg, tmp_path / "with_peak")
    flops = GPT(cfg.model.model_copy(update={"vocab_size": 65})).flops_per_token()
    for r in train_records(tmp_path / "with_peak"):
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * flops / peak, rel=1e-9)
    train(
        load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=2, sample_tokens=0)),
        tmp_path / "cpu",
    )
    assert all("mfu" not in r for r in train_records(tmp_path / "cpu"))


def test_a_restart_drops_what_was_logged_after_the_last_checkpoint(shakespeare_dataset, tmp_path):
    """Killed at step 7 with its last checkpoint at 5: the rerun's metrics hold each step exactly once."""
    common = tiny_overrides(shakespeare_dataset, max_steps=10, checkpoint_interval=5, eval_interval=5, sample_tokens=0)
    train(load_config(CPU_CONFIG, [*common, "train.max_steps=7"]), tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 8))
    tags = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")]
    for tag in tags:  # pretend the kill came before the save at the end: only step 5 survives
        if tag != "step_000005":
            import shutil

            shutil.rmtree(tmp_path / "checkpoints" / tag)
    (tmp_path / "checkpoints" / "latest").write_text("step_000005")
    train(load_config(CPU_CONFIG, common), tmp_path)
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, 11)), steps
    assert metrics.read_text().count('"val_loss"') == 2  # evaluations at 5 and 10, once each


def test_lr_warms_up_linearly_then_decays_by_a_half_cosine_to_min_lr():
    """lr 1, min_lr 0.1, 4 warm-up steps, decay over 14: by hand, (s+1)/5 while warming up, the peak at step 4, the
    midpoint (step 9) 0.1 + 0.9/2, min_lr from step 14 on; with lr_decay_steps null the decay follows max_steps."""
    from megagpt.config import TrainConfig

    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, lr_decay_steps=14, max_steps=20)
    schedule = [lr_at(s, t) for s in range(20)]
    assert schedule[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert schedule[9] == pytest.approx(0.55) and schedule[14:] == pytest.approx([0.1] * 6)
    assert all(a > b for a, b in zip(schedule[4:14], schedule[5:15], strict=True))  # decreasing to the end
    follows_max_steps = t.model_copy(update={"lr_decay_steps": None, "max_steps": 14})
    assert [lr_at(s, follows_max_steps) for s in range(20)] == schedule


def test_a_resume_that_stretches_a_null_lr_decay_says_what_the_lr_becomes(tmp_path):
    """lr_decay_steps null follows max_steps: raising max_steps (as a finished run advises) moves the LR of every
    step from the resume on; before, only `train.max_steps: 10 -> 20` was said while the LR jumped 10x."""
    from megagpt.config import save_config
    from megagpt.train import _resume_notes

    def cfg(**train):
        return load_config(CPU_CONFIG, [f"train.{k}={v}" for k, v in {"warmup_steps": 2, **train}.items()])

    save_config(cfg(max_steps=10, lr_decay_steps="null"), tmp_path / "config.yaml")
    stretched = cfg(max_steps=20, lr_decay_steps="null")
    old, new = lr_at(10, cfg(max_steps=10, lr_decay_steps="null").train), lr_at(10, stretched.train)
    assert _resume_notes(tmp_path / "config.yaml", stretched, 10) == [
        "settings changed since the run's last start: train.max_steps: 10 -> 20",
        f"train.lr_decay_steps is null, so the LR decays over train.max_steps (10 -> 20): step 11 trains at lr "
        f"{new:.3g}, not {old:.3g}; --set train.lr_decay_steps=10 keeps the schedule it had"]
    kept = cfg(max_steps=20, lr_decay_steps=10)  # the way out: the schedule it had, and nothing more to say of it
    assert lr_at(10, kept.train) == old
    assert _resume_notes(tmp_path / "config.yaml", kept, 10) == [
        "settings changed since the run's last start: train.lr_decay_steps: None -> 10; train.max_steps: 10 -> 20"]


def test_tensorboard_after_a_restart_holds_the_steps_metrics_jsonl_holds(tmp_path):
    """Killed after step 7 with its checkpoint at 5: the rerun keeps step 5's records in TensorBoard too (they were
    purged with the steps after it, so TensorBoard lacked the loss and evaluation of every resume's first step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = RunLogger(tmp_path, True, start_step=0, max_steps=10, progress_bar=False)
    for step in range(1, 8):
        killed.log(step, {"loss": float(step)})
    killed.log(5, {"val_loss": 0.5}, section="val")
    killed.close()
    resumed = RunLogger(tmp_path, True, start_step=5, max_steps=10, progress_bar=False)
    for step in range(6, 11):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in read_metrics(tmp_path) if "loss" in r]
    assert logged == [(s, float(s)) for s in range(1, 6)] + [(s, 10.0 + s) for s in range(6, 11)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == logged
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(5, 0.5)]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_logged_grad_norm_is_the_first_steps_true_gradient_norm(shakespeare_dataset, tmp_path, zero_stage, capfd):
    """Against plain autograd on the same initial weights and the same first batch."""
    from megagpt.data import TrainLoader
    from megagpt.model import GPT

    cfg = load_config(
        CPU_CONFIG,
        [*tiny_overrides(shakespeare_dataset, max_steps=1, sample_tokens=0), f"deepspeed.zero_stage={zero_stage}"],
    )
    train(cfg, tmp_path)
    assert f"done: 1 step, in {tmp_path};" in capfd.readouterr().out  # before, "1 steps"
    logged = train_records(tmp_path)[0]
    model_cfg = cfg.model.model_copy(update={"vocab_size": 65})
    torch.manual_seed(cfg.train.seed)
    model = GPT(model_cfg)
    x, y = next(
        iter(
            TrainLoader(
                shakespeare_dataset, model_cfg.block_size, cfg.train.micro_batch_size, 1, 0, 1, seed=cfg.train.seed
            )
        )
    )
    model(x, y)[1].backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"] is not None


def test_resume_never_refuses_a_run_dir_that_has_checkpoints(shakespeare_dataset, tmp_path):
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=2, sample_tokens=0))
    train(cfg, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, tmp_path, resume="never")
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost
    assert train(cfg, tmp_path / "fresh", resume="never").step == 2


def _reference_losses(cfg, dataset_dir, steps: int, clip: bool) -> list[float]:
    """Plain torch on the run's initial weights and batches: loss, backward, clip_grad_norm_ (if `clip`), AdamW."""
    from megagpt.data import TrainLoader
    from megagpt.engine import param_groups
    from megagpt.model import GPT

    t, model_cfg = cfg.train, cfg.model.model_copy(update={"vocab_size": 65})
    torch.manual_seed(t.seed)
    model = GPT(model_cfg)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                            foreach=False)
    batches = iter(TrainLoader(dataset_dir, model_cfg.block_size, t.micro_batch_size, 1, 0, 1, seed=t.seed))
    out = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        loss = model(*next(batches))[1]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("clip_over_norm", [0.25, 4.0])
def test_the_guard_clips_like_clip_grad_norm_and_never_scales_a_small_gradient_up(clip_over_norm):
    """Fused AdamW through the step guard against float64 AdamW after torch's clip_grad_norm_, with gradients of
    different norms each step: all clipped (0.25), or none (4.0: a scale where no clip is due would show, since
    Adam's moments mix the steps' gradients)."""
    from helpers import guarded_adamw, guarded_step

    torch.manual_seed(0)
    w0, grads = torch.randn(10), [torch.randn(10) * s for s in (1.0, 0.3, 3.0)]
    clip = clip_over_norm * grads[0].norm().item()
    w, optimizer, guard = guarded_adamw(w0, clip)
    ref = torch.nn.Parameter(w0.double())
    ref_optimizer = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
    for g in grads:
        guarded_step(w, optimizer, guard, g)
        ref.grad = g.double()
        torch.nn.utils.clip_grad_norm_([ref], clip)
        ref_optimizer.step()
        assert guard.grad_norm() == pytest.approx(g.norm().item(), rel=1e-6)  # the norm before clipping
    assert torch.allclose(w.detach().double(), ref.detach(), atol=1e-6)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_gradients_are_clipped_to_grad_clip(shakespeare_dataset, tmp_path, zero_stage):
    """grad_clip far below the gradient norm: the losses follow plain torch's clip_grad_norm_ + AdamW, not the
    unclipped updates (ZeRO 0 fp32: the step guard clips through AdamW's grad_scale; ZeRO 2: DeepSpeed clips)."""
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=4, sample_tokens=0, lr=1e-2,
                                                 warmup_steps=0, grad_clip=0.05, zero_stage=zero_stage))
    train(cfg, tmp_path)
    got = [r["loss"] for r in train_records(tmp_path)]
    clipped = _reference_losses(cfg, shakespeare_dataset, 4, clip=True)
    unclipped = _reference_losses(cfg, shakespeare_dataset, 4, clip=False)
    assert min(r["grad_norm"] for r in train_records(tmp_path)) > 10 * cfg.train.grad_clip  # clipping is active
    assert got == pytest.approx(clipped, rel=1e-5)
    assert abs(got[-1] - unclipped[-1]) > 100 * abs(got[-1] - clipped[-1])


def test_a_zero_stage_set_through_deepspeed_extra_cannot_switch_clipping_off(shakespeare_dataset, tmp_path):
    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=1, sample_tokens=0))
    extra = {"zero_optimization": {"stage": 1}}  # the config refuses it; the trainer's own check stays behind it
    cfg = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"extra": extra})})
    with pytest.raises(UserError, match="train.grad_clip would apply nowhere"):
        train(cfg, tmp_path)


def test_an_evaluation_line_shows_every_measure_of_the_stage():
    # before, only val_loss reached the console: a reward model's accuracy and PPO's reward and KL did not
    assert eval_line(2000, {"val_loss": 1.75531}) == "step 2000: val loss 1.7553"
    assert eval_line(300, {"val_loss": 0.3, "val_accuracy": 0.873}) == "step 300: val loss 0.3000, accuracy 0.8730"
    assert eval_line(150, {"val_reward_model_score": 1.5, "val_kl": 0.25}) == \
        "step 150: val reward model score 1.5000, kl 0.2500"
    assert eval_line(300, {"val_loss": 0.96651, "val_assistant_tokens": 7564.0}) == \
        "step 300: val loss 0.9665, assistant tokens 7564"  # SFT's count of the tokens it scored


def test_progress_goes_to_a_log_as_plain_lines_not_a_redrawn_bar(tmp_path, capfd, monkeypatch):
    # under pytest stderr is not a terminal, as in a batch job's output file
    monkeypatch.setattr(metrics_module, "LINE_PROGRESS_EVERY_S", 0.0)
    log = RunLogger(tmp_path, True, start_step=0, max_steps=4, tensorboard=False, progress_bar=True)
    for step in range(1, 5):
        log.progress(1, loss=f"{4 - step:.4f}", tok_s="1,000")
    log.close()
    err = capfd.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [f"train: step {s}/4 ({s / 4:.0%}): loss {4 - s:.4f}, tok_s 1,000" for s in range(1, 5)]
    monkeypatch.setattr(metrics_module, "LINE_PROGRESS_EVERY_S", 3600.0)  # the default: a line at most so often
    log = RunLogger(tmp_path, True, start_step=0, max_steps=4, tensorboard=False, progress_bar=True)
    for _ in range(4):
        log.progress(1, loss="1.0000")
    log.close()
    assert capfd.readouterr().err.splitlines() == ["train: step 4/4 (100%): loss 1.0000"]  # and at the last step


def test_the_first_bf16_zero_0_update_is_adamws_first_step():
    """DeepSpeed's 16-bit optimizer wrapper (ZeRO 0 in bf16: the CPU default `auto` where bf16 is native) steps
    AdamW once on zero gradients when built; megagpt forgets that step (the first update was 0.74x AdamW's), so
    the first update of the fp32 master weights is AdamW's first (float64 reference: p (1 - lr wd) -
    lr g / (|g| + eps)), from masters equal to the model's weights."""
    from megagpt.distributed import init_distributed
    from megagpt.engine import build_engine
    from megagpt.model import GPT

    cfg = load_config(CPU_CONFIG, ["model.vocab_size=65", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                   "model.block_size=16", "train.dtype=bf16", "train.grad_clip=0.0",
                                   "train.global_batch_tokens=192"])
    engine = build_engine(cfg, init_distributed(cfg.deepspeed.timeout_minutes), lambda: GPT(cfg.model))
    wrapper = engine.optimizer
    weights = [p for group in wrapper.fp16_groups for p in group]
    masters = [p for group in wrapper.fp32_groups for p in group]
    assert all(torch.equal(m, w.float()) for m, w in zip(masters, weights, strict=True))
    x = torch.randint(0, 65, (12, 16))
    engine.backward(engine(x, x.roll(-1, dims=1))[1])
    before = [m.detach().double().clone() for m in masters]
    grads = [w.grad.double() for w in weights]
    engine.step()
    eps = wrapper.optimizer.defaults["eps"]
    k = 0
    for group in wrapper.param_groups:
        for _ in group["params"]:
            p, g = before[k], grads[k]
            want = p * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * g / (g.abs() + eps)
            assert (masters[k].double() - want).abs().max() < 1e-6, k
            k += 1
