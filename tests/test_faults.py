"""Faults and bad input: Ctrl-C saves, a run dir has one owner, a refused command changes nothing, a torn
metrics line, `latest` as a hint, a full disk, export and sample arguments; real processes and real signals."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import (
    BASE_CONFIG,
    REPO,
    child_env,
    finish,
    losses,
    metrics,
    set_args,
    single,
    tiny,
    torchrun,
    wait_for,
    worker_pids,
)

from megagpt.checkpoint import (
    Checkpointer,
    CheckpointSaveError,
    NoVerifiedCheckpoint,
    tag_for,
    verify_manifest,
    write_manifest,
)
from megagpt.cli import main as cli_main
from megagpt.config import load_config
from megagpt.distributed import DistInfo
from megagpt.errors import UserError
from megagpt.export import export
from megagpt.inference import load_for_inference
from megagpt.metrics import RunLogger
from megagpt.run_lock import LOCK_NAME, RunDirBusy, RunLock
from megagpt.sample import check_sampling_args, sample_texts
from megagpt.train import train

ONE_RANK = DistInfo(0, 0, 1)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """Every file's sha256 and every folder, by relative path: equal snapshots mean a byte-identical tree."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


def checkpoints(run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir / "checkpoints", ONE_RANK)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def error_lines(log: str) -> list[str]:
    """The lines a user would read as the error (DeepSpeed's import-time notices aside)."""
    return [line for line in log.splitlines() if "error" in line.lower() or "Traceback" in line]


def python(code: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=child_env(), cwd=REPO,
                            **popen)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: its parent may be an init that does not reap)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def trained(shakespeare_dataset, tmp_path_factory) -> Path:
    """One process, 6 steps, a checkpoint every 2: tags step_000002, 4 and 6. Copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    train(load_config(None, tiny(shakespeare_dataset, max_steps=6, checkpoint_interval=2)), run_dir)
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------
def test_ctrl_c_saves_at_the_next_step_and_exits_zero_with_one_line(shakespeare_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = single(run_dir, tiny(shakespeare_dataset, max_steps=100_000))
    wait_for(lambda: len(losses(run_dir)) >= 3, 120, "step 3")
    proc.send_signal(signal.SIGINT)
    assert finish(proc, timeout=60, ok=False) == [0]
    log = proc.log_path.read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    k = max(losses(run_dir))
    assert f"stop requested (SIGINT): saved step {k}, exiting" in log
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(k)  # nothing lost: the last step saved
    assert verify_manifest(run_dir / "checkpoints" / tag_for(k)) is None


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(shakespeare_dataset, tmp_path):
    """Steps of ~1 s, so the second Ctrl-C lands before the save the first one asked for."""
    run_dir = tmp_path / "run"
    slow = tiny(shakespeare_dataset, max_steps=100_000, checkpoint_interval=2, micro_batch_size=32,
                model_n_embd=128, model_block_size=128, model_n_layer=4)
    proc = single(run_dir, slow)
    wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), 180, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl-C: saving" in proc.log_path.read_text(), 30, "the first Ctrl-C's message")
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert finish(proc, timeout=30, ok=False) == [130]
    assert time.monotonic() - sent < 5
    log = proc.log_path.read_text()
    assert "Traceback" not in log and "exiting now without saving" in log
    assert "stop requested" not in log  # it did not save
    ckpt = checkpoints(run_dir)
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert ckpt.latest_good_tag() == latest  # the newest complete checkpoint is still the newest verified one


# ---------------------------------------------------------------------------------------------
# Nothing that refuses to run changes a run
# ---------------------------------------------------------------------------------------------
def test_a_refused_train_command_is_one_line_and_leaves_the_run_dir_byte_identical(run_copy, shakespeare_dataset):
    before = snapshot(run_copy)
    proc = single(run_copy, tiny(shakespeare_dataset, max_steps=8, checkpoint_interval=2, model_n_layer=3))
    assert finish(proc, timeout=120, ok=False) == [2]
    lines = error_lines(proc.log_path.read_text())
    assert len(lines) == 1 and "model.n_layer=3" in lines[0] and "step_000006" in lines[0], lines
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("case", ["resume never", "other model", "other vocab", "other dtype", "other zero stage",
                                  "all tags damaged"])
def test_refusals_leave_the_run_dir_byte_identical(case, run_copy, shakespeare_dataset):
    resume, overrides = "auto", tiny(shakespeare_dataset, max_steps=8, checkpoint_interval=2)
    if case == "resume never":
        resume, error, match = "never", UserError, "already holds checkpoints"
    elif case == "other model":
        overrides, error, match = [*overrides, "model.n_embd=48"], UserError, "model.n_embd=48"
    elif case == "other vocab":  # the vocabulary comes from the dataset unless set: the message says which
        overrides, error = [*overrides, "model.vocab_size=80"], UserError
        match = (r"model.vocab_size=80 \(set, or else the vocabulary of data.dataset_dir=.*\) but checkpoint "
                 r"step_000006 was trained with 65: resume with the same model and data, or start a new --run-dir")
    elif case == "other dtype":  # before the check, DeepSpeed's loader failed with a KeyError traceback
        overrides, error, match = [*overrides, "train.dtype=bf16"], UserError, "train.dtype='bf16' .* in 'fp32'"
    elif case == "other zero stage":  # before the check, DeepSpeed's loader failed after config.yaml was written
        overrides, error = [*overrides, "deepspeed.zero_stage=1"], UserError
        match = (r"deepspeed.zero_stage=1 but checkpoint step_000006 was saved under ZeRO 0, whose files that stage "
                 r"cannot load: resume with --set deepspeed.zero_stage=0, or start a new --run-dir")
    else:
        for tag in checkpoints(run_copy).tags():
            flip_a_byte(run_copy / "checkpoints" / tag / "mp_rank_00_model_states.pt")
        error, match = NoVerifiedCheckpoint, "no checkpoint verifies .*step_000006: .*--resume never"
    before = snapshot(run_copy)
    with pytest.raises(error, match=match):
        train(load_config(None, overrides), run_copy, resume=resume)
    assert snapshot(run_copy) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_on_a_cpu_is_refused_before_the_run_dir_is_written(shakespeare_dataset, tmp_path):
    # before, DeepSpeed's sanity check raised "Type fp16 is not supported on your device" as a traceback
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="train.dtype: fp16 needs a CUDA GPU .* use fp32, bf16 or auto"):
        train(load_config(None, [*tiny(shakespeare_dataset, max_steps=2), "train.dtype=fp16"]), run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_a_complete_run_trains_nothing_and_writes_nothing_even_with_changed_settings(run_copy,
                                                                                      shakespeare_dataset, capfd):
    # the fixture's run is at its max_steps (6); before, a rerun with a --set rewrote config.yaml, trained nothing
    before = snapshot(run_copy)
    overrides = [*tiny(shakespeare_dataset, max_steps=6, checkpoint_interval=2), "train.lr=3e-4"]
    summary = train(load_config(None, overrides), run_copy)
    assert (summary.step, summary.resumed_from, summary.tokens_seen) == (6, "step_000006", None)
    assert (f"{run_copy} is complete: step_000006 is at train.max_steps (6), nothing to train (to train on, "
            "raise train.max_steps") in capfd.readouterr().err
    assert snapshot(run_copy) == before
    lowered = train(load_config(None, [*overrides, "train.max_steps=4"]), run_copy)
    assert lowered.step == 6  # was "step_000006 is at train.max_steps (4)"
    assert f"{run_copy} is complete: step_000006 is past train.max_steps (4), nothing" in capfd.readouterr().err
    assert snapshot(run_copy) == before


def test_a_resume_names_the_settings_it_changes_and_a_finished_run_what_to_do_next(run_copy, shakespeare_dataset,
                                                                                     capfd):
    overrides = [*tiny(shakespeare_dataset, max_steps=8, checkpoint_interval=2), "train.lr=3e-4"]
    lr_before = load_config(None, tiny(shakespeare_dataset)).train.lr
    train(load_config(None, overrides), run_copy)
    out = capfd.readouterr().out
    assert ("settings changed since the run's last start: "
            f"train.lr: {lr_before!r} -> 0.0003; train.max_steps: 6 -> 8\n") in out
    assert f"done: 8 steps, in {run_copy}; next, sample it: megagpt sample {run_copy}\n" in out
    assert load_config(run_copy / "config.yaml").train.lr == 3e-4  # the run's config is how it goes on


@pytest.mark.parametrize("resume, says", [("sometimes", "no such directory"),
                                          ("RUN", "not a checkpoint dir (its name is not step_NNNNNN)")])
def test_a_resume_that_names_no_checkpoint_dir_says_so(resume, says, run_copy, shakespeare_dataset):
    resume = str(run_copy) if resume == "RUN" else resume
    before = snapshot(run_copy)
    with pytest.raises(UserError, match=rf"--resume {resume}: {re.escape(says)}; pass auto, never, or a "):
        train(load_config(None, tiny(shakespeare_dataset, max_steps=8)), run_copy, resume=resume)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("run_dir, says", [
    (lambda tmp: tmp / "file", "--run-dir {tmp}/file: is a file; pass a directory"),
    (lambda tmp: tmp / "file" / "run", "--run-dir {tmp}/file/run: is inside {tmp}/file, which is a file"),
    (lambda tmp: tmp / ("é" * 130), "a name of 260 bytes ('éééééééééééééééééééé'...), over the 255 a file system "
                                    "takes; choose a shorter one"),
])
def test_a_run_dir_where_no_directory_can_be_made_is_one_line(run_dir, says, shakespeare_dataset, tmp_path):
    (tmp_path / "file").write_text("notes")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=re.escape(says.format(tmp=tmp_path))):
        train(load_config(None, tiny(shakespeare_dataset)), run_dir(tmp_path))
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# One owner per run dir
# ---------------------------------------------------------------------------------------------
HOLD = """
    import sys, time
    from megagpt.run_lock import RunLock
    lock = RunLock.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_job_on_a_run_dir_exits_at_once_naming_the_holder(run_copy, shakespeare_dataset):
    holder = python(HOLD, str(run_copy), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_copy)
        proc = single(run_copy, tiny(shakespeare_dataset, max_steps=8, checkpoint_interval=2))
        assert finish(proc, timeout=120, ok=False) == [2]
        lines = error_lines(proc.log_path.read_text())
        assert len(lines) == 1, lines
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in lines[0]
        assert snapshot(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
    RunLock.acquire(run_copy).release()  # the kernel released the dead holder's lock: no stale lock


def test_the_lock_names_its_holder_and_a_refusal_puts_the_run_dir_back(tmp_path):
    fresh = tmp_path / "new" / "run"
    lock = RunLock.acquire(fresh)
    holder = json.loads((fresh / LOCK_NAME).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    other = python("import sys; from megagpt.run_lock import RunLock; RunLock.acquire(sys.argv[1])", str(fresh),
                   stderr=subprocess.PIPE, text=True)
    _, err = other.communicate(timeout=60)
    assert other.returncode == 1 and f"in use by pid {os.getpid()}" in err
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()}"):  # a second open file: also refused
        RunLock.acquire(fresh)
    lock.release(undo=True)
    assert not (tmp_path / "new").exists()  # the lock file and the folders it made are gone

    existing = tmp_path / "old"
    existing.mkdir()
    (existing / LOCK_NAME).write_text("a previous job's holder line\n")
    RunLock.acquire(existing).release(undo=True)
    assert (existing / LOCK_NAME).read_text() == "a previous job's holder line\n"


WATCHED = """
    import os, sys, time
    os.environ["RANK"] = "0"
    from megagpt import run_lock
    if sys.argv[2] == "poll":  # without the kernel's help (PR_SET_PDEATHSIG): the thread that polls getppid
        run_lock._die_with_parent = lambda: False
    assert run_lock.start_parent_watchdog(interval=0.2)
    while True:
        open(sys.argv[1], "w").write(str(time.time()))
        time.sleep(0.05)
"""
LAUNCHER = """
    import subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]])
    print(worker.pid, flush=True)
    worker.wait()
"""


@pytest.mark.parametrize("how", ["kernel", "poll"])
def test_a_worker_whose_launcher_is_killed_stops_within_a_second(how, tmp_path):
    beat = tmp_path / "heartbeat"
    launcher = python(LAUNCHER, textwrap.dedent(WATCHED), str(beat), how, stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    wait_for(beat.exists, 60, "the worker's first heartbeat")
    launcher.kill()  # SIGKILL: the launcher cannot tell its worker anything
    launcher.wait()
    killed = time.monotonic()
    wait_for(lambda: gone(worker), 5, "the orphaned worker to exit")
    assert time.monotonic() - killed < 2
    last = beat.read_text()
    time.sleep(0.3)
    assert beat.read_text() == last


@pytest.mark.distributed
def test_workers_stop_when_torchrun_is_killed_and_write_nothing_after(shakespeare_dataset, tmp_path):
    run_dir = tmp_path / "run"
    launcher = torchrun(run_dir, tiny(shakespeare_dataset, max_steps=100_000, checkpoint_interval=3))
    wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), 120, "the first checkpoint")
    workers = worker_pids(launcher)
    assert len(workers) == 2
    os.kill(launcher.pid, signal.SIGKILL)  # the agent only: its workers are in sessions of their own
    killed = time.monotonic()
    wait_for(lambda: all(gone(pid) for pid in workers), 10, "the workers to exit")
    assert time.monotonic() - killed < 1.5
    finish(launcher, ok=False)
    before = snapshot(run_dir)
    time.sleep(1)
    assert snapshot(run_dir) == before
    RunLock.acquire(run_dir).release()  # and rank 0's lock went with it


@pytest.mark.distributed
def test_sigterm_to_torchrun_saves_and_ends_in_one_line_not_a_traceback(shakespeare_dataset, tmp_path):
    """A preemption's SIGTERM to the launcher (Slurm, a user's kill): torchrun forwards it, the worker saves and
    exits 0. Before megagpt.launcher, torchrun's SignalException then ended the log in a traceback."""
    run_dir = tmp_path / "run"
    launcher = torchrun(run_dir, tiny(shakespeare_dataset, max_steps=100_000), 1)
    wait_for(lambda: len(losses(run_dir)) >= 3, 120, "step 3")
    launcher.send_signal(signal.SIGTERM)
    assert finish(launcher, timeout=60, ok=False) == [128 + signal.SIGTERM]
    log = launcher.log_path.read_text()
    k = max(losses(run_dir))
    assert "Traceback" not in log and f"stop requested (SIGTERM): saved step {k}, exiting" in log
    said = [line for line in log.splitlines() if line.startswith("torchrun: stopped by SIGTERM: the workers were")]
    assert len(said) == 1 and "run the same command to resume" in said[0], log[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == tag_for(k)


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_with_one_warning(tmp_path, capfd):
    records = [{"step": s, "loss": 4.0 - s / 10} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    RunLogger(tmp_path, True, start_step=3, max_steps=10, tensorboard=False, progress_bar=False).close()
    assert metrics(tmp_path) == records[:3]
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "dropping a torn last line" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no metrics.jsonl.tmp


def test_a_torn_metrics_line_does_not_stop_the_resume(run_copy, shakespeare_dataset):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.1')  # the crash came in the middle of a write
    train(load_config(None, tiny(shakespeare_dataset, max_steps=8, checkpoint_interval=2)), run_copy)
    assert train_steps(run_copy) == list(range(1, 9))


def test_a_metrics_line_in_the_middle_that_is_not_a_record_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl, line 2: not a metrics record"):
        RunLogger(tmp_path, True, start_step=1, max_steps=10, tensorboard=False, progress_bar=False)


# ---------------------------------------------------------------------------------------------
# `latest` is a hint
# ---------------------------------------------------------------------------------------------
def make_tags(directory: Path, steps: list[int], sealed: bool = True) -> None:
    for step in steps:
        tag_dir = directory / tag_for(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / "weights.pt").write_bytes(os.urandom(64))
        if sealed:
            write_manifest(tag_dir, {"step": step})


@pytest.mark.parametrize("latest, picked, note", [
    (None, 6, "latest is missing; using step_000006"),
    ("", 6, "latest is empty; using step_000006"),
    ("garbage\x00", 6, "latest holds 'garbage\\x00', not a checkpoint tag; using step_000006"),
    ("step_000009", 6, "latest names step_000009, which does not exist; using step_000006"),
    ("step_000002", 6, "latest names step_000002, but step_000006 is newer and verifies"),
    ("step_000006", 6, None),
])
def test_latest_is_a_hint_the_newest_verified_tag_wins(latest, picked, note, tmp_path, capfd):
    make_tags(tmp_path, [2, 4, 6])
    make_tags(tmp_path, [8], sealed=False)  # a save that was interrupted: never a candidate, not worth a word
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    assert Checkpointer(tmp_path, ONE_RANK).latest_good_tag() == tag_for(picked)
    err = capfd.readouterr().err
    if note is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and note in err


def test_a_damaged_newest_tag_is_skipped_with_a_line_each(tmp_path, capfd):
    make_tags(tmp_path, [2, 4, 6])
    flip_a_byte(tmp_path / "step_000006" / "weights.pt")
    (tmp_path / "latest").write_text("step_000006")
    assert Checkpointer(tmp_path, ONE_RANK).latest_good_tag() == "step_000004"
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "skipping checkpoint step_000006: " in lines[0] and "does not match its sha256" in lines[0]
    assert "using step_000004, the newest checkpoint that verifies, not step_000006" in lines[1]


def test_all_tags_damaged_is_a_refusal_but_unfinished_saves_are_not(tmp_path):
    make_tags(tmp_path, [2, 4])
    for step in (2, 4):
        flip_a_byte(tmp_path / tag_for(step) / "weights.pt")
    choice = Checkpointer(tmp_path, ONE_RANK).choose_tag()
    assert choice.tag is None and [d.split(":")[0] for d in choice.damaged] == ["step_000004", "step_000002"]
    assert "--resume never" in str(choice.refusal(tmp_path))

    unfinished = tmp_path / "unfinished"
    make_tags(unfinished, [2], sealed=False)  # killed during its first save: starting over loses nothing
    choice = Checkpointer(unfinished, ONE_RANK).choose_tag()
    assert choice.tag is None and choice.refusal(unfinished) is None
    assert any("did not finish" in note for note in choice.notes)


def test_a_garbage_latest_resumes_from_the_newest_verified_tag(run_copy, shakespeare_dataset, capfd):
    (run_copy / "checkpoints" / "latest").write_text("\x00\x00")
    train(load_config(None, tiny(shakespeare_dataset, max_steps=8, checkpoint_interval=2)), run_copy)
    assert train_steps(run_copy) == list(range(1, 9))  # resumed at 6: nothing repeated
    assert "not a checkpoint tag; using step_000006" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root can mount one); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(trained, small_disk,
                                                                                     shakespeare_dataset):
    run_dir = Path(shutil.copytree(trained, small_disk / "run", ignore=shutil.ignore_patterns("step_000002",
                                                                                               "step_000004")))
    tag_bytes = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "step_000006").rglob("*"))
    filler = fill(small_disk, leave=tag_bytes // 2)  # room for the metrics lines, not for a checkpoint
    cfg = load_config(None, tiny(shakespeare_dataset, max_steps=10, checkpoint_interval=2))
    with pytest.raises(CheckpointSaveError) as failed:
        train(cfg, run_dir)
    message = str(failed.value)
    assert "\n" not in message and str(run_dir / "checkpoints" / "step_000008") in message
    assert "no space left on device" in message and "(step_000006)" in message and "free there" in message
    assert checkpoints(run_dir).tags() == ["step_000006"]  # the partial tag was removed
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000006"
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]

    filler.unlink()
    train(cfg, run_dir)  # space again: the same command resumes from step 6
    assert train_steps(run_dir) == list(range(1, 11))


def test_a_full_disk_when_a_run_starts_is_one_line_and_leaves_nothing(small_disk, shakespeare_dataset, capfd):
    fill(small_disk, leave=0)
    argv = ["train", str(BASE_CONFIG), *set_args(tiny(shakespeare_dataset)), "--run-dir", str(small_disk / "run")]
    assert cli_main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"megagpt train: error: No space left on device writing {small_disk / 'run' / LOCK_NAME}")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_disk_full_while_dropping_metrics_leaves_no_temporary_file(small_disk):
    records = "".join(json.dumps({"step": s, "loss": 1.0, "pad": "x" * 200}) + "\n" for s in range(1, 2000))
    (small_disk / "metrics.jsonl").write_text(records)
    fill(small_disk, leave=4096)
    with pytest.raises(OSError) as full:
        RunLogger(small_disk, True, start_step=1000, max_steps=2000, tensorboard=False, progress_bar=False)
    assert full.value.errno == errno.ENOSPC
    assert not (small_disk / "metrics.jsonl.tmp").exists()
    assert (small_disk / "metrics.jsonl").read_text() == records  # untouched


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def test_export_refuses_a_non_empty_out_unless_force_replaces_an_earlier_export(trained, tmp_path):
    out = tmp_path / "export"
    export(trained, out, fmt="hf")
    with pytest.raises(UserError, match="is not empty; pass --force"):
        export(trained, out)
    export(trained, out, force=True)  # megagpt format over the hf one: nothing of the hf export is left
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors",
                                                     "tokenizer"]
    assert sample_texts(out, "ROMEO:", 8, seed=1) == sample_texts(trained, "ROMEO:", 8, seed=1)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no earlier export"):
        export(trained, other, force=True)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "notes"]  # no temporary folders left


@pytest.mark.parametrize("where, message", [
    (lambda run: run, "is the run dir"),
    (lambda run: run / "export", "is inside the run dir"),
    (lambda run: run / "checkpoints" / "x", "is inside the run dir"),
    (lambda run: run.parent, "contains the run dir"),
])
def test_export_refuses_an_out_in_or_around_the_run_dir(where, message, run_copy):
    before = snapshot(run_copy.parent)
    with pytest.raises(UserError, match=message):
        export(run_copy, where(run_copy), force=True)
    assert snapshot(run_copy.parent) == before


def test_export_refuses_an_out_under_a_file_and_an_export_dir_as_its_run(trained, tmp_path):
    (tmp_path / "file").write_text("notes")
    with pytest.raises(UserError, match=f"--out {tmp_path}/file/x: is inside {tmp_path}/file, which is a file"):
        export(trained, tmp_path / "file" / "x")
    out = export(trained, tmp_path / "export")
    with pytest.raises(UserError, match=f"{out}: an export dir already"):
        export(out, tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "file"]


def test_export_to_the_current_folder_writes_it_there(run_copy, tmp_path, monkeypatch):
    """`--out .` from an empty folder: the sibling was made inside it and renaming `.` failed (EBUSY), leaving
    a `..old-*` folder behind while saying nothing was left."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    export(run_copy, Path("."), step=4)
    assert sorted(p.name for p in here.iterdir()) == ["config.yaml", "export.json", "model.safetensors", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "run"]


def test_a_failed_export_leaves_nothing_behind(trained, small_disk):
    fill(small_disk, leave=8192)  # the weights do not fit
    with pytest.raises(UserError, match="could not write the export .*No space left on device"):
        export(trained, small_disk / "export")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 0}, "--num-samples 0: must be at least 1"),
    ({"max_new_tokens": -5}, "--max-new-tokens -5: must be at least 1"),
    ({"temperature": -1.0}, "--temperature -1.0: must be a finite number >= 0"),
    ({"temperature": float("nan")}, "--temperature nan"),
    ({"top_k": 0}, "--top-k 0: must be at least 1"),
    ({"top_p": 1.5}, r"--top-p 1.5: must be in \(0, 1\]"),
    ({"top_p": 0.0}, r"--top-p 0.0: must be in \(0, 1\]"),
    ({"seed": 2**63}, r"--seed 9223372036854775808: must be between 0 and 2\*\*63 - 1"),
    ({"seed": -1}, "--seed -1: must be between"),
])
def test_sampling_arguments_out_of_range_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as bad:
        check_sampling_args(**kwargs)
    assert "\n" not in str(bad.value)


def test_sampling_arguments_in_range_pass():
    check_sampling_args(num_samples=1, max_new_tokens=1, temperature=0.0, top_k=None, top_p=1.0)
    check_sampling_args(num_samples=3, max_new_tokens=5, temperature=2.0, top_k=1, top_p=1e-3, seed=2**63 - 1)
    check_sampling_args(seed=0)


@pytest.mark.parametrize("seed", [-1, 2**63])
@pytest.mark.parametrize("command", [
    ["sample", "RUN"], ["chat", "RUN"], ["eval", "qa", "RUN", "--data", "QA"], ["eval", "prefs", "RUN", "--out", "OUT"],
    ["prep", "shakespeare-prefs", "--sft", "RUN", "--qa", "QA", "--out", "OUT"],
    ["prep", "char", "--input", "CORPUS", "--out", "OUT"],
    ["prep", "chat", "--input", "CHATS", "--tokenizer", "RUN", "--out", "OUT"],
    ["prep", "preferences", "--input", "PAIRS", "--tokenizer", "RUN", "--out", "OUT"],
])
def test_a_seed_no_generator_takes_is_refused_first_by_every_command(command, seed, tmp_path, capsys):
    # every path named is missing: the seed is checked before any of them is read
    argv = [str(tmp_path / a) if a.isupper() else a for a in command]
    assert cli_main([*argv, "--seed", str(seed)]) == 2
    err = capsys.readouterr().err
    assert f"--seed {seed}: must be between 0 and 2**63 - 1" in err and len(err.strip().splitlines()) == 1


def test_a_reward_run_is_refused_by_sample_in_one_line(run_copy):
    """A reward model's forward gives scores, not logits: refused whether or not the KV cache is used (without
    it, the scores were indexed as logits: an IndexError traceback)."""
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("stage: pretrain", "stage: reward"))
    for use_cache in (True, False):
        with pytest.raises(UserError, match=f"{run_copy}: a reward model .* does not generate it"):
            sample_texts(run_copy, "A", 4, use_cache=use_cache)


def test_characters_outside_the_vocabulary_are_named_once_each(trained):
    with pytest.raises(UserError, match="2 characters not in the model's char vocabulary: '@' '#'"):
        sample_texts(trained, "@#ROMEO@", 4)


def test_sample_tells_a_run_dir_from_an_export_dir(run_copy, tmp_path):
    out = export(run_copy, tmp_path / "export", step=4)
    with pytest.raises(UserError, match="--step 2: .* is an export of one checkpoint \\(step_000004\\)"):
        sample_texts(out, "A", 4, step=2)
    with pytest.raises(UserError, match="--step 5: .* no checkpoint of that step; available steps: 2, 4, 6"):
        sample_texts(run_copy, "A", 4, step=5)
    # an export written into the run dir by an older megagpt: the run's checkpoints are still what it samples
    for name in ("model.safetensors", "export.json"):
        shutil.copy(out / name, run_copy / name)
    exported = load_for_inference(out)[0].state_dict()
    for step, same in ((4, True), (6, False)):
        weights = load_for_inference(run_copy, step=step)[0].state_dict()
        assert all(torch.equal(weights[k], exported[k]) for k in exported) == same, step
    with pytest.raises(UserError, match="nothing: no such directory; pass a run dir, an export dir or a "):
        sample_texts(tmp_path / "nothing", "A", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run dir .* nor an export dir"):
        sample_texts(tmp_path / "empty", "A", 4)



@pytest.mark.parametrize("text", ["{bad", "[1, 2]"])
def test_an_export_with_a_damaged_export_json_is_one_line_naming_it(run_copy, tmp_path, text):
    from megagpt.init_from import open_source

    out = export(run_copy, tmp_path / "export", step=4)
    (out / "export.json").write_text(text)
    with pytest.raises(UserError, match=f"{out / 'export.json'}: .*export the run again"):
        sample_texts(out, "A", 4, step=2)
    with pytest.raises(UserError, match=f"{out / 'export.json'}: .*export the run again"):
        open_source(str(out))

@pytest.mark.parametrize("saved, edited, says", [
    ("n_embd: 32", "n_embd: 48", "model.n_embd is 48 but checkpoint step_000006 was trained with 32"),
    ("n_head: 2", "n_head: 4", "model.n_head is 4 but checkpoint step_000006 was trained with 2"),  # loaded, wrong
    ("parametrization: standard", "parametrization: mup",
     "model.parametrization is 'mup' but checkpoint step_000006 was trained with 'standard'"),
])
def test_a_config_edited_after_training_is_refused_by_sample_and_export(run_copy, tmp_path, saved, edited, says):
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace(saved, edited))
    with pytest.raises(UserError, match=re.escape(f"{config}: {says}; was it edited after training? put back "
                                                  f"{saved}")):
        sample_texts(run_copy, "A", 4)
    with pytest.raises(UserError, match=re.escape(says)):
        export(run_copy, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_weights_that_do_not_fit_an_export_dirs_config_are_one_line(run_copy, tmp_path):
    out = export(run_copy, tmp_path / "export")
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("n_embd: 32", "n_embd: 48"))
    with pytest.raises(UserError, match="config.yaml does not describe the saved weights .*size mismatch"):
        sample_texts(out, "A", 4)


def test_bad_sample_arguments_are_one_line_on_the_command_line(trained):
    result = subprocess.run([sys.executable, "-m", "megagpt", "sample", str(trained), "--top-p", "1.5"],
                            env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "megagpt sample: error: --top-p 1.5: must be in (0, 1]"
    assert "Traceback" not in result.stderr


def test_sample_into_a_closed_pipe_ends_quietly(trained, tmp_path, monkeypatch, capsys):
    """`megagpt sample RUN | head -1`: the reader gone, the rest of the text is dropped without a BrokenPipeError
    traceback, and the exit status is a SIGPIPE'd writer's (141), as for cat."""
    from megagpt.cli import main as megagpt

    class ClosedPipe:
        def __init__(self, fd: int):
            self.fd = fd

        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.fd  # a file of the test's own: the command points it at /dev/null

    with open(tmp_path / "stdout", "w") as own:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(own.fileno()))
        assert megagpt(["sample", str(trained), "--max-new-tokens", "3", "--num-samples", "2"]) == 141
    assert capsys.readouterr().err == ""


def test_the_megagpt_command_leaves_the_process_group_before_exiting(shakespeare_dataset, tmp_path):
    # a rank that refuses (here: --resume naming no checkpoint) after joining the group exits 2 with the group
    # destroyed, not left to interpreter shutdown (where gloo's threads could end it in SIGABRT)
    code = f"""
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("group left:", not dist.is_initialized(), flush=True))
sys.argv = ["megagpt", "train", {str(BASE_CONFIG)!r}, *{set_args(tiny(shakespeare_dataset))!r},
            "--run-dir", {str(tmp_path / "run")!r}, "--resume", "nowhere"]
from megagpt.cli import console_main
console_main()
"""
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--resume nowhere: no such directory" in done.stderr
    assert done.stdout.strip().endswith("group left: True")


@pytest.mark.parametrize("obstacle", ["latest as a folder", "checkpoints as a file"])
def test_something_where_checkpoints_go_is_refused_before_training(obstacle, shakespeare_dataset, tmp_path):
    # before, a folder named `latest` failed the first save, naming a temp file, after the steps before it trained
    run_dir = tmp_path / "run"
    if obstacle == "latest as a folder":
        (run_dir / "checkpoints" / "latest").mkdir(parents=True)
        match = r"checkpoints/latest is not a file .*: move it away"
    else:
        run_dir.mkdir()
        (run_dir / "checkpoints").write_text("notes")
        match = r"checkpoints: is a file; the run's checkpoints go there: move it away"
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=match):
        train(load_config(None, tiny(shakespeare_dataset, max_steps=2)), run_dir)
    assert snapshot(run_dir) == before
