"""megagpt.files.write_whole: a reader finds the old file or the new one, never a part; no temporary file is left."""

import os

import pytest

from megagpt.files import write_whole


@pytest.mark.parametrize("fsync", [True, False])
def test_text_and_bytes_replace_the_file_whole(tmp_path, fsync):
    path = tmp_path / "latest"
    write_whole(path, "step_000002", fsync=fsync)
    write_whole(path, b"step_000004", fsync=fsync)
    assert path.read_bytes() == b"step_000004" and os.listdir(tmp_path) == ["latest"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_whole(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
