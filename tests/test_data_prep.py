"""data_prep: the Shakespeare dataset, determinism, splits, atomic and resumable writes, corpus inputs."""

import gzip
import hashlib
import json
import shutil
import tarfile

import numpy as np
import pytest

import data_prep
from data_prep.cli import main as prep_main
from data_prep.prep import PrepSettings, prepare
from megagpt.dataset import human_bytes, load_tokenizer, verify_main


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _tokens(dataset_dir, split):
    """Every token of a split, read back with tarfile alone (independent of megagpt.data)."""
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    out = []
    for k in range(manifest["splits"][split]["shards"]):  # shards are named by their position
        with tarfile.open(dataset_dir / f"{split}-{k:06d}.tar") as tar:
            for member in tar:
                dtype = {"uint16": "<u2", "uint32": "<u4"}[manifest["token_dtype"]]
                out.append(np.frombuffer(tar.extractfile(member).read(), dtype=dtype))
    return np.concatenate(out) if out else np.empty(0, np.uint16)


def _sources(dataset_dir):
    """The input files prep recorded (sources.jsonl: path, bytes, sha256), checked against the manifest's summary."""
    summary = json.loads((dataset_dir / "manifest.json").read_text())["sources"]
    listing = (dataset_dir / summary["list"]).read_bytes()
    assert hashlib.sha256(listing).hexdigest() == summary["sha256"]
    files = [json.loads(line) for line in listing.decode().splitlines()]
    assert len(files) == summary["files"] and sum(f["bytes"] for f in files) == summary["bytes"]
    return files


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
    assert _sources(out)[0]["sha256"] == hashlib.sha256(shakespeare_path.read_bytes()).hexdigest()


def test_prep_shakespeare_and_data_verify_say_counts_and_sizes_in_human_units(shakespeare_path, tmp_path, capsys):
    out = tmp_path / "sh"
    assert prep_main(["shakespeare", "--out", str(out), "--input", str(shakespeare_path)]) == 0
    n, shards = len(shakespeare_path.read_text()), sorted(out.glob("*.tar"))
    assert capsys.readouterr().out.splitlines() == [
        f"megagpt prep shakespeare: vocab 65 (char), {n} tokens (train {int(n * 0.9)}, val {n - int(n * 0.9)}), "
        f"{len(shards)} shards", f"wrote {out}"]
    assert verify_main([str(out)]) == 0
    megabytes = sum(p.stat().st_size for p in shards) / 1e6  # 2.2 MB: not "0.00 GB"
    assert f"{len(shards)} shards ({megabytes:.1f} MB) match the manifest" in capsys.readouterr().out


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (999, "999 bytes"), (1000, "1.0 KB"), (2_234_567, "2.2 MB"),
                                     (5 * 10**9, "5.0 GB"), (3.5e12, "3.5 TB")])
def test_sizes_are_shown_in_the_largest_unit_they_reach(n, text):
    assert human_bytes(n) == text


def test_prep_twice_gives_byte_identical_files(shakespeare_path, tmp_path):
    a = data_prep.prepare_shakespeare(tmp_path / "a", shakespeare_path)
    b = data_prep.prepare_shakespeare(tmp_path / "b", shakespeare_path)
    assert _files(a) == _files(b)


def test_a_missing_input_is_a_one_line_error(tmp_path, capsys):
    """Tiny Shakespeare needs no network (it ships with megagpt, tests/test_shakespeare_embedded.py); a bad
    --input is still one line naming it."""
    assert prep_main(["shakespeare", "--out", str(tmp_path / "sh"), "--input", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.txt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sh").exists()


def _write_corpus(root, rng):
    """A dir of .txt, .jsonl.gz and .txt.gz inputs; returns the documents in the order prep reads them."""
    words = ["alpha", "beta", "γάμμα", "delta\t", "  ", "épée", "\n", "zeta", "ηλ", "42"]
    doc = lambda n: "".join(rng.choice(words, n))
    root.mkdir()
    docs = {"a.txt": [doc(400)], "b.jsonl.gz": [doc(150), doc(3), doc(200)], "c.txt.gz": [doc(300)]}
    (root / "a.txt").write_text(docs["a.txt"][0])
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for d in docs["b.jsonl.gz"]:
            f.write(json.dumps({"body": d}) + "\n")
    with gzip.open(root / "c.txt.gz", "wt", newline="") as f:
        f.write(docs["c.txt.gz"][0])
    (root / "ignored.csv").write_text("not a corpus file")
    return [d for name in sorted(docs) for d in docs[name]]


def _settings(**kw):
    base = {"text_field": "body", "shard_size_mb": 0.002, "sample_tokens": 101, "chunk_chars": 700}
    return PrepSettings(**{**base, **kw})


def test_documents_are_joined_by_eos_in_input_order(tmp_path):
    docs = _write_corpus(tmp_path / "corpus", np.random.default_rng(1014))
    out = prepare([tmp_path / "corpus"], tmp_path / "ds", _settings(val_fraction=0.0))
    chars = sorted(set("".join(docs)))
    eos = len(chars)
    expected = []
    for i, d in enumerate(docs):
        expected += ([eos] if i else []) + [chars.index(c) for c in d]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == len(chars) + 1 and manifest["eos_id"] == eos
    assert _tokens(out, "train").tolist() == expected
    assert manifest["splits"]["train"]["shards"] > 2 and manifest["splits"]["val"]["tokens"] == 0
    assert [s["path"].rsplit("/", 1)[1] for s in _sources(out)] == ["a.txt", "b.jsonl.gz", "c.txt.gz"]


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_prep_is_byte_identical_for_one_and_two_workers(tmp_path, kind):
    _write_corpus(tmp_path / "corpus", np.random.default_rng(1015))
    extra = {"vocab_size": 300, "shard_size_mb": 0.0005} if kind == "sentencepiece" else {}
    one = prepare([str(tmp_path / "corpus" / "*.gz"), tmp_path / "corpus" / "a.txt"], tmp_path / "one",
                  _settings(tokenizer=kind, workers=1, **extra))
    two = prepare([str(tmp_path / "corpus" / "*.gz"), tmp_path / "corpus" / "a.txt"], tmp_path / "two",
                  _settings(tokenizer=kind, workers=2, **extra))
    assert len([n for n in _files(one) if n.endswith(".tar")]) > 3
    assert _files(one) == _files(two)


def test_rerun_after_interruption_reuses_verified_shards(tmp_path, monkeypatch):
    import data_prep.prep as prep_module

    _write_corpus(tmp_path / "corpus", np.random.default_rng(1016))
    fresh = prepare([tmp_path / "corpus"], tmp_path / "fresh", _settings())
    written = []
    real_write = prep_module.write_shard

    def failing_write(job, out_dir):
        if len(written) == 3:
            raise KeyboardInterrupt  # killed while writing the 4th shard
        written.append(job.name)
        return real_write(job, out_dir)

    monkeypatch.setattr(prep_module, "write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "corpus"], tmp_path / "ds", _settings())
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial" / "manifest.json").exists()
    damaged = tmp_path / "ds.partial" / written[0]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])  # a finished shard that went bad is rewritten
    log = (tmp_path / "ds.partial" / "progress.jsonl").read_text().splitlines()
    finished = {json.loads(line)["shard"]["name"] for line in log if '"shard"' in line}
    assert damaged.name in finished and len(finished) >= 2

    written.clear()
    monkeypatch.setattr(prep_module, "write_shard",
                        lambda job, out: written.append(job.name) or real_write(job, out))
    out = prepare([tmp_path / "corpus"], tmp_path / "ds", _settings())
    all_shards = {n for n in _files(fresh) if n.endswith(".tar")}
    assert sorted(written) == sorted(all_shards - finished | {damaged.name})
    assert _files(out) == _files(fresh)


def test_a_user_error_removes_a_fresh_partial_but_keeps_one_resumed_from_a_kill(tmp_path, monkeypatch):
    import data_prep.prep as prep_module
    from megagpt.errors import UserError

    _write_corpus(tmp_path / "corpus", np.random.default_rng(1017))
    real_write = prep_module.write_shard

    def write_then(error, after):
        def write(job, out_dir):
            if write.calls == after:
                raise error
            write.calls += 1
            return real_write(job, out_dir)
        write.calls = 0
        return write

    monkeypatch.setattr(prep_module, "write_shard", write_then(UserError("bad input"), 2))
    with pytest.raises(UserError, match="bad input"):
        prepare([tmp_path / "corpus"], tmp_path / "ds", _settings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # a deterministic error leaves nothing

    monkeypatch.setattr(prep_module, "write_shard", write_then(KeyboardInterrupt(), 2))
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "corpus"], tmp_path / "ds", _settings())
    log = (tmp_path / "ds.partial" / "progress.jsonl").read_text()
    monkeypatch.setattr(prep_module, "write_shard", write_then(UserError("bad input"), 1))
    with pytest.raises(UserError, match="bad input"):
        prepare([tmp_path / "corpus"], tmp_path / "ds", _settings())
    assert (tmp_path / "ds.partial" / "progress.jsonl").read_text().startswith(log)  # the kill's work stays


def test_an_out_inside_an_input_folder_is_never_read_as_input(tmp_path, monkeypatch):
    import data_prep.prep as prep_module

    _write_corpus(tmp_path / "corpus", np.random.default_rng(1018))
    fresh = prepare([tmp_path / "corpus"], tmp_path / "fresh", _settings())
    inside = tmp_path / "corpus" / "ds"  # its sources.jsonl and progress.jsonl are .jsonl files in the folder
    prepare([tmp_path / "corpus"], inside, _settings())
    assert _files(prepare([tmp_path / "corpus"], inside, _settings(), force=True)) == _files(fresh)
    shutil.rmtree(inside)  # another dataset in the folder would be read: only a prep's own output is left out

    real_write = prep_module.write_shard
    monkeypatch.setattr(prep_module, "write_shard", lambda job, out: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "corpus"], tmp_path / "corpus" / "ds2", _settings())
    written = []
    monkeypatch.setattr(prep_module, "write_shard", lambda job, out: written.append(job) or real_write(job, out))
    assert _files(prepare([tmp_path / "corpus", f"{tmp_path}/corpus/**/*.jsonl*"], tmp_path / "corpus" / "ds2",
                          _settings())) == _files(fresh)
    assert written and not (tmp_path / "corpus" / "ds2.partial").exists()


def test_tar_overhead_is_below_2_percent(shakespeare_path, tmp_path):
    out = data_prep.prepare_shakespeare(tmp_path / "sh", shakespeare_path)
    manifest = json.loads((out / "manifest.json").read_text())
    payload = 2 * sum(split["tokens"] for split in manifest["splits"].values())
    assert sum(p.stat().st_size for p in out.glob("*.tar")) < 1.02 * payload


def test_cli_char_and_existing_out(tmp_path, capsys):
    _write_corpus(tmp_path / "corpus", np.random.default_rng(1017))
    args = ["char", "--input", str(tmp_path / "corpus"), "--out", str(tmp_path / "ds"),
            "--text-field", "body", "--workers", "2", "--shard-size-mb", "0.01"]
    assert prep_main(args) == 0 and (tmp_path / "ds" / "manifest.json").is_file()
    assert prep_main(args) == 2 and "--force" in capsys.readouterr().err
    assert prep_main([*args, "--force"]) == 0


def test_missing_input_and_bad_jsonl_are_one_line_errors(tmp_path, capsys):
    assert prep_main(["char", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "ds")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    assert prep_main(["char", "--input", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "ds")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
