"""Checkpoints on disk: keep the last K and every M-th; a corrupt, truncated or unsealed newest is skipped."""

import re

import pytest
from dist_helpers import tiny
from helpers import train_records

from megagpt.checkpoint import MANIFEST, Checkpointer, NoVerifiedCheckpoint, verify_manifest
from megagpt.config import load_config
from megagpt.distributed import DistInfo
from megagpt.train import train
from megagpt.universal import find_resume_point


@pytest.fixture
def run_with_tags(shakespeare_dataset, tmp_path):
    """One process, 10 steps, a checkpoint every 2, keep the last 2 plus every 4th."""
    run_dir = tmp_path / "run"
    train(load_config(None, tiny(shakespeare_dataset, max_steps=10, checkpoint_interval=2, keep_checkpoints=2,
                                 keep_every=4)), run_dir)
    return run_dir, shakespeare_dataset


def test_keeps_the_last_k_and_every_mth(run_with_tags):
    run_dir, _ = run_with_tags
    assert Checkpointer(run_dir / "checkpoints", DistInfo(0, 0, 1)).tags() == ["step_000004", "step_000008",
                                                                               "step_000010"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000010"


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda tag: flip_a_byte(tag / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt does not"),
    (lambda tag: (tag / "rng_rank00000.pt").write_bytes(b"x"), "rng_rank00000.pt has 1 bytes"),
    (lambda tag: (tag / MANIFEST).unlink(), f"{MANIFEST} is missing"),
])
def test_a_damaged_latest_is_reported_and_the_previous_good_one_resumes(run_with_tags, damage, message, capfd):
    run_dir, dataset = run_with_tags
    damage(run_dir / "checkpoints" / "step_000010")
    capfd.readouterr()
    train(load_config(None, tiny(dataset, max_steps=12, checkpoint_interval=2, keep_checkpoints=2,
                                 keep_every=4)), run_dir)
    assert re.search(f"warning: skipping checkpoint step_000010: .*{message}", capfd.readouterr().err)
    # resumed from step 8: the records past it (9, 10 of the first run) were dropped and logged again
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_an_unsealed_tag_newer_than_latest_is_never_used(run_with_tags, capfd):
    """A save killed half-way leaves a tag without manifest, and `latest` still names the previous one."""
    run_dir, _ = run_with_tags
    ckpt = run_dir / "checkpoints"
    (ckpt / "step_000012").mkdir()
    (ckpt / "step_000012" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    capfd.readouterr()
    assert Checkpointer(ckpt, DistInfo(0, 0, 1)).latest_good_tag() == "step_000010"
    assert capfd.readouterr().err == ""  # an interrupted save is expected after a kill: not worth a word
    (ckpt / "latest").write_text("step_000012")  # even if `latest` named it
    assert Checkpointer(ckpt, DistInfo(0, 0, 1)).latest_good_tag() == "step_000010"
    assert re.search("skipping checkpoint step_000012: .*megagpt_manifest.json is missing", capfd.readouterr().err)



def test_a_save_removes_what_a_killed_write_of_latest_left(run_with_tags):
    """write_whole's temporary sibling of `latest`, left by a process killed mid-write under another pid."""
    run_dir, dataset = run_with_tags
    stale = run_dir / "checkpoints" / ".latest.tmp4242"
    stale.write_text("step_0000")
    train(load_config(None, tiny(dataset, max_steps=12, checkpoint_interval=2, keep_checkpoints=2,
                                 keep_every=4)), run_dir)
    assert not stale.exists() and (run_dir / "checkpoints" / "latest").read_text() == "step_000012"

@pytest.mark.parametrize("manifest", ['[1]', '{"files": [1]}', '{"files": {"model.pt": 1}}',
                                      '{"files": {"model.pt": {"bytes": "many"}}}', 'half a{'])
def test_a_manifest_of_the_wrong_shape_makes_the_tag_unusable_not_a_crash(tmp_path, manifest, capfd):
    """A hand-edited or foreign manifest: the tag is skipped (auto) or refused (an explicit tag) by name."""
    ckpt = tmp_path / "checkpoints"
    tag = ckpt / "step_000002"
    tag.mkdir(parents=True)
    (tag / "model.pt").write_bytes(b"weights")
    (tag / MANIFEST).write_text(manifest)
    assert re.fullmatch(rf"{tag / MANIFEST} is unreadable \(\w+Error: .*\)", verify_manifest(tag))
    with pytest.raises(NoVerifiedCheckpoint, match="step_000002: .* is unreadable"):
        find_resume_point(Checkpointer(ckpt, DistInfo(0, 0, 1)), "auto", DistInfo(0, 0, 1))


def test_a_universal_conversion_is_reused_only_for_the_checkpoint_it_was_made_from(tmp_path, monkeypatch):
    # --resume PATH converts another run dir's step_000004 into this run's checkpoints/, where a conversion by
    # the same name may be of this run's own step_000004: reusing it would load other weights
    import megagpt.universal as universal

    converted = []

    def fake_converter(tag_dir, out, source):
        converted.append(tag_dir)
        out.mkdir(parents=True)
        (out / universal.DONE).write_text(f"{source}\n")

    monkeypatch.setattr(universal, "_run_converter", fake_converter)
    ours, theirs = tmp_path / "ours" / "checkpoints", tmp_path / "theirs" / "checkpoints"
    for checkpoints, step in ((ours, 4), (theirs, 7)):
        (checkpoints / "step_000004").mkdir(parents=True)
        (checkpoints / "step_000004" / MANIFEST).write_text(f'{{"step": 4, "of": {step}}}')
    dist = DistInfo(0, 0, 1)
    for tag_dir in (ours / "step_000004", ours / "step_000004", theirs / "step_000004", ours / "step_000004"):
        assert universal.convert_to_universal(tag_dir, ours, dist) == ours / "step_000004_universal"
    assert converted == [ours / "step_000004", theirs / "step_000004", ours / "step_000004"]  # the 2nd reused
    assert not (theirs / "step_000004_universal").exists()
