"""The Tiny Shakespeare shipped inside data_prep: its checksum, its shards, and an installed wheel that preps it."""

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import data_prep
from data_prep import shakespeare
from megagpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ISSUE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # issue 16: the uncompressed text


def shard_digests(dataset_dir: Path) -> dict[str, str]:
    """sha256 of every shard and of the tokenizer file, by file name."""
    files = [*sorted(dataset_dir.glob("*.tar")), dataset_dir / "tokenizer.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def raw_digests(shakespeare_path, tmp_path_factory) -> dict[str, str]:
    """The reference: shards prepared from the raw input.txt."""
    out = tmp_path_factory.mktemp("raw") / "shakespeare_char"
    data_prep.prepare_shakespeare(out, input_path=shakespeare_path)
    digests = shard_digests(out)
    assert {"train-000000.tar", "val-000000.tar", "tokenizer.json"} <= digests.keys()
    return digests


def test_embedded_copy_is_the_raw_text_with_the_issues_sha256(shakespeare_path):
    text = gzip.decompress(shakespeare.embedded_copy().read_bytes())
    assert hashlib.sha256(text).hexdigest() == ISSUE_SHA256
    assert text == shakespeare_path.read_bytes()


def test_default_prep_reads_the_embedded_copy_offline_into_the_raw_texts_shards(raw_digests, tmp_path,
                                                                               monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default Shakespeare prep opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = data_prep.prepare_shakespeare(tmp_path / "shakespeare_char")
    assert shard_digests(out) == raw_digests
    sources = [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]  # manifest: a summary
    assert [Path(s["path"]).name for s in sources] == ["tinyshakespeare.txt.gz"]


@pytest.mark.parametrize("damage", ["not_gzip", "truncated", "other_text"])
def test_a_damaged_embedded_copy_is_a_one_line_error(shakespeare_path, tmp_path, monkeypatch, damage):
    good = shakespeare.embedded_copy().read_bytes()
    bad = {"not_gzip": shakespeare_path.read_bytes()[:1000],
           "truncated": good[: len(good) // 2],
           "other_text": gzip.compress(shakespeare_path.read_bytes().replace(b"ROMEO", b"ROMEA", 1))}[damage]
    path = tmp_path / "tinyshakespeare.txt.gz"
    path.write_bytes(bad)
    monkeypatch.setattr(shakespeare, "embedded_copy", lambda: path)
    with pytest.raises(UserError) as err:
        data_prep.prepare_shakespeare(tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "--input" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _run(cmd: list, **kwargs) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build_wheel(tmp_path: Path, env: dict) -> Path:
    """The wheel of a copy of the source tree (so the build writes nothing into the shared checkout), offline."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for init in REPO.glob("*/__init__.py"):  # every top-level package; pyproject's find picks its own
        package = init.parent.name
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", src,
          "-w", tmp_path / "wheels"], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "wheels").glob("megagpt-*.whl")
    return wheel


def _fresh_venv_with(wheel: Path, tmp_path: Path, env: dict) -> Path:
    """A new venv holding only the wheel; this venv's site-packages is appended to its sys.path by a .pth
    line, which makes the dependencies importable but not the editable megagpt (that dir's .pth files,
    the editable finder among them, are not processed)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
         cwd=tmp_path, env=env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "ci_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


def test_an_installed_wheel_preps_the_embedded_copy_offline_into_the_raw_texts_shards(raw_digests, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    venv = _fresh_venv_with(_build_wheel(tmp_path, env), tmp_path, env)
    where = _run([venv / "bin" / "python", "-c",
                  "import megagpt, data_prep.shakespeare as s; print(megagpt.__file__); "
                  "print(s.__file__); print(s.embedded_copy())"], cwd=tmp_path, env=env).split()
    assert len(where) == 3 and all(Path(p).is_relative_to(venv) for p in where), where

    out = tmp_path / "data" / "shakespeare_char"
    _run([venv / "bin" / "megagpt", "prep", "shakespeare", "--out", out], cwd=tmp_path, env=env)
    assert shard_digests(out) == raw_digests
    (source,) = [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]
    assert Path(source["path"]).is_relative_to(venv)
