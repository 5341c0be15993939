"""data_prep: the Shakespeare dataset, determinism, splits, atomic and resumable writes, corpus inputs."""

import hashlib
import json
import tarfile

import numpy as np

import data_prep
from data_prep.cli import main as prep_main
from megagpt.tokenizer import load_tokenizer


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _tokens(dataset_dir, split):
    """Every token of a split, read back with tarfile alone (independent of megagpt.data)."""
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(dataset_dir / shard["name"]) as tar:
            for member in tar:
                dtype = {"uint16": "<u2", "uint32": "<u4"}[manifest["token_dtype"]]
                out.append(np.frombuffer(tar.extractfile(member).read(), dtype=dtype))
    return np.concatenate(out) if out else np.empty(0, np.uint16)


def test_shakespeare_has_65_chars_and_nanogpt_split(shakespeare_path, tmp_path):
    out = data_prep.prepare_shakespeare(tmp_path / "sh", shakespeare_path)
    text = shakespeare_path.read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 65 == len(set(text))
    assert manifest["eos_id"] is None and manifest["token_dtype"] == "uint16"
    n = len(text)
    assert manifest["splits"]["train"]["tokens"] == int(n * 0.9)
    assert manifest["splits"]["val"]["tokens"] == n - int(n * 0.9)
    chars = sorted(set(text))
    tok = load_tokenizer(out)
    assert tok.decode(_tokens(out, "train").tolist()) == text[: int(n * 0.9)]
    assert tok.decode(_tokens(out, "val").tolist()) == text[int(n * 0.9):]
    assert _tokens(out, "train")[:5].tolist() == [chars.index(c) for c in text[:5]]
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(shakespeare_path.read_bytes()).hexdigest()


def test_prep_twice_gives_byte_identical_files(shakespeare_path, tmp_path):
    a = data_prep.prepare_shakespeare(tmp_path / "a", shakespeare_path)
    b = data_prep.prepare_shakespeare(tmp_path / "b", shakespeare_path)
    assert _files(a) == _files(b)


def test_shakespeare_without_network_says_how_to_pass_input(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert prep_main(["shakespeare", "--out", str(tmp_path / "sh")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--input" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sh").exists()
