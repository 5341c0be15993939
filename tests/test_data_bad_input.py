"""Bad input on the data side: one line naming the file, line, key or value, no traceback, nothing lost.

Each case here was found by feeding prep, `megagpt data verify` and the loader what a careless or unlucky user
would (a stray byte deep in a file, `--shard-size-mb nan`, `--out` under a file, `--force` onto the wrong folder,
a hand-edited manifest, another dataset's tokenizer, a chat dataset given to pre-training)."""

import gzip
import json

import numpy as np
import pytest
from chat_helpers import chat_dataset, conversation

from benchmarks.data import main as bench_data
from data_prep.prep import PrepSettings, prepare
from data_prep.sources import _first_bad_utf8, iter_chunks
from megagpt.chat_template import ConversationError, check_messages
from megagpt.cli import main as megagpt
from megagpt.data import EvalWindows, TrainLoader
from megagpt.dataset import DataError, Dataset, verify_main
from megagpt.errors import UserError
from megagpt.tokenizer import tokenizer_from_file

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A small char dataset (several documents: EOS reserved)."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "a.txt").write_text(TEXT)
    (root / "b.txt").write_text(TEXT[::-1])
    return prepare([root / "a.txt", root / "b.txt"], root / "tokens", PrepSettings(shard_size_mb=0.002,
                                                                                   sample_tokens=500))


def _one_line_error(argv, capsys) -> str:
    code = megagpt(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize("name", ["deep.txt", "deep.jsonl", "deep.txt.gz"])
def test_a_bad_utf8_byte_is_named_by_its_offset_and_line_in_the_file(name, tmp_path, capsys):
    """The text reader's own error counts from the start of the block it decodes (8 KiB and more into a file,
    a wrong offset, and no line): the file's own offset and line are reported."""
    good = (json.dumps({"text": "fine line"}) + "\n") * 3000 if ".jsonl" in name else "fine line\n" * 3000
    raw = good.encode() + (b'{"text": "\xff"}\n' if ".jsonl" in name else b"\xff\n")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    err = _one_line_error(["prep", "char", "--input", str(path), "--out", str(tmp_path / "ds")], capsys)
    assert f"at byte {raw.index(0xFF)}" in err and "(line 3001)" in err, err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


def test_a_bad_utf8_byte_in_a_conversation_file_names_its_line(tokens, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    line = (json.dumps(conversation("To be, or not", "Whether")) + "\n").encode()
    path.write_bytes(line * 500 + b'{"messages": "\xff"}\n')
    err = _one_line_error(["prep", "chat", "--input", str(path), "--tokenizer", str(tokens), "--out",
                           str(tmp_path / "c")], capsys)
    offset = path.read_bytes().index(0xFF)
    assert f"at byte {offset} (line 501)" in err, err


BOM = "\ufeff".encode()  # the byte-order mark Windows tools (Notepad, PowerShell) write at the start of UTF-8


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.jsonl.gz"])
def test_a_corpus_file_opening_with_a_byte_order_mark_reads_as_the_same_text(name, tmp_path):
    # before, a .jsonl was refused ("Unexpected UTF-8 BOM") and a .txt gave the vocabulary a U+FEFF character
    raw = (json.dumps({"text": TEXT}) + "\n").encode() if ".jsonl" in name else TEXT.encode()
    plain, marked = tmp_path / name, tmp_path / f"bom_{name}"
    plain.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    marked.write_bytes(gzip.compress(BOM + raw) if name.endswith(".gz") else BOM + raw)
    assert list(iter_chunks([marked], chunk_chars=256)) == list(iter_chunks([plain], chunk_chars=256))


def test_a_conversation_file_opening_with_a_byte_order_mark_is_read(tokens, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(BOM + (json.dumps(conversation("To be, or not", "Whether")) + "\n").encode() * 20)
    assert megagpt(["prep", "chat", "--input", str(path), "--tokenizer", str(tokens), "--out",
                    str(tmp_path / "c")]) == 0, capsys.readouterr().err  # before: "not valid JSON"


def test_the_first_bad_utf8_byte_is_found_across_read_blocks(tmp_path):
    """Against bytes.decode's own offset, with multi-byte characters split between blocks of every size."""
    rng, path = np.random.default_rng(), tmp_path / "x.txt"
    for _ in range(200):
        parts = rng.choice(["a", "\n", "é", "€", "𝄞"], rng.integers(0, 30)).tolist()
        raw = bytearray("".join(parts).encode())
        if rng.random() < 0.8:
            raw.insert(int(rng.integers(0, len(raw) + 1)), int(rng.choice([0x80, 0xC3, 0xE2, 0xF0, 0xFF])))
        path.write_bytes(raw)
        try:
            raw.decode()
            expected = None
        except UnicodeDecodeError as e:
            expected = (e.start, raw[:e.start].count(b"\n") + 1)
        assert _first_bad_utf8(str(path), block_size=int(rng.integers(1, 8))) == expected, bytes(raw)


def test_messages_that_are_not_a_list_are_named_as_such():
    with pytest.raises(ConversationError, match="expected a list of messages, found str 'hello'"):
        check_messages("hello")


# ---------------------------------------------------------------- settings and --out


@pytest.mark.parametrize("kind, flags, named", [
    ("char", ["--shard-size-mb", "nan"], "--shard-size-mb nan"),
    ("char", ["--shard-size-mb", "inf"], "--shard-size-mb inf"),
    ("sentencepiece", ["--vocab-size", "0"], "--vocab-size 0"),
    ("sentencepiece", ["--vocab-size", "1"], "--vocab-size 1: sentencepiece needs at least 5 pieces"),  # "INTERNAL"
    ("sentencepiece", ["--sample-size", "0"], "--sample-size 0"),
    ("sentencepiece", ["--threads", "-1"], "--threads -1"),
    ("chat", ["--shard-size-mb", "nan"], "--shard-size-mb nan"),
    ("preferences", ["--shard-size-mb", "inf"], "--shard-size-mb inf"),
])
def test_out_of_range_numbers_are_refused_before_any_work(kind, flags, named, tokens, tmp_path, capsys):
    source = tmp_path / ("in.txt" if kind in ("char", "sentencepiece") else "in.jsonl")
    source.write_text(TEXT)
    extra = ["--tokenizer", str(tokens)] if kind in ("chat", "preferences") else []
    err = _one_line_error(["prep", kind, "--input", str(source), "--out", str(tmp_path / "ds"), *extra, *flags],
                          capsys)
    assert named in err, err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.partial").exists()


@pytest.mark.parametrize("kind", ["char", "chat", "shakespeare-qa"])
def test_an_out_under_a_file_is_a_one_line_error(kind, tokens, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    source = tmp_path / ("in.txt" if kind == "char" else "in.jsonl")
    source.write_text(TEXT if kind == "char" else json.dumps(conversation("To be, or not", "Whether")) + "\n")
    inputs = {"char": ["--input", str(source)], "chat": ["--input", str(source), "--tokenizer", str(tokens)],
              "shakespeare-qa": []}[kind]
    err = _one_line_error(["prep", kind, *inputs, "--out", str(tmp_path / "file" / "ds")], capsys)
    assert f"{tmp_path / 'file'} is a file, not a folder" in err, err


@pytest.mark.parametrize("out", [".", ".."])
def test_an_out_without_a_name_is_a_one_line_error(out, tmp_path, monkeypatch, capsys):
    (tmp_path / "in.txt").write_text(TEXT)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # an empty folder: --force may replace it
    err = _one_line_error(["prep", "char", "--input", "../in.txt", "--out", out, "--force"], capsys)
    assert f"--out {out}: name the dataset dir itself" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "in.txt"]


@pytest.mark.parametrize("kind", ["char", "chat"])
def test_force_replaces_a_dataset_but_never_a_folder_of_other_things(kind, tokens, tmp_path, capsys):
    source = tmp_path / ("in.txt" if kind == "char" else "in.jsonl")
    source.write_text(TEXT if kind == "char" else json.dumps(conversation("To be, or not", "Whether")) + "\n")
    inputs = ["--input", str(source)] + (["--tokenizer", str(tokens)] if kind == "chat" else [])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("a file")
    for out in ("mine", "notes.txt"):
        err = _one_line_error(["prep", kind, *inputs, "--out", str(tmp_path / out), "--force"], capsys)
        assert "not a dataset dir" in err, err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "notes.txt").read_text() == "a file"
    for _ in range(2):  # a dataset (the second time) and an empty folder (the first) are replaced
        (tmp_path / "ds").mkdir(exist_ok=True)
        assert megagpt(["prep", kind, *inputs, "--out", str(tmp_path / "ds"), "--force"]) == 0
        assert (tmp_path / "ds" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".ds", "ds"))) == ["ds"]


@pytest.mark.parametrize("killed, datasets, left", [  # what replace_out_dir's swap leaves, killed at each point
    ("before the first rename", {"ds": "old", "ds.partial": "new"}, "old"),  # and an empty .ds.replaced-*
    ("between the renames", {".ds.replaced-k1ll/ds": "old", "ds.partial": "new"}, "new"),  # no ds
    ("while removing the old one", {".ds.replaced-k1ll/ds": "old", "ds": "new"}, "new")])
def test_a_force_swap_a_kill_interrupted_is_finished_by_the_next_prep(killed, datasets, left, tmp_path, capsys):
    # before, the old dataset stayed hidden in .ds.replaced-* for good, and between the renames the re-run
    # deleted the finished ds.partial and started over without a ds
    from data_prep.out_dir import work_dir_for

    (tmp_path / ".ds.replaced-k1ll").mkdir()
    for name, which in datasets.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "manifest.json").write_text(which)
    assert work_dir_for(tmp_path / "ds", force=True) == tmp_path / "ds.partial"
    assert (tmp_path / "ds" / "manifest.json").read_text() == left
    assert not (tmp_path / ".ds.replaced-k1ll").exists()
    said = capsys.readouterr().err
    assert ("finished replacing it, which a killed prep had left half done (the new dataset)" in said) == \
        (killed == "between the renames"), said


# ---------------------------------------------------------------- the dataset dir and the loader


@pytest.mark.parametrize("content", ['{"kind": "char", "chars": ["ab", "c"]}', '{"kind": "char", "chars": null}',
                                     '[1]', '{"kind": "char", "chars": [1, 2]}', '{"chars": ["a", "a"]}',
                                     '{"chars": ["a"], "eos_id": 5}'])
def test_a_corrupt_char_tokenizer_file_is_a_one_line_error(content, tmp_path):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(UserError, match="tokenizer.json: not a readable char tokenizer"):
        tokenizer_from_file("char", tmp_path / "tokenizer.json")


def test_a_tokenizer_that_does_not_fit_the_manifest_stops_a_run_before_it_trains(tokens, tmp_path, capsys):
    """Another dataset's tokenizer.json (or an edited vocab_size) was found only at the first sample, as a
    traceback or as garbled text; now the run's copy of the tokenizer and `data verify` refuse it."""
    import shutil

    edited = shutil.copytree(tokens, tmp_path / "edited")
    (edited / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": list("abc"), "eos_id": None}))
    with pytest.raises(DataError, match="tokenizer.json: 3 ids .* says vocab_size"):
        Dataset(edited).copy_tokenizer_to(tmp_path / "run" / "tokenizer")
    with pytest.raises(DataError, match="says vocab_size"):
        verify_main([str(edited)])
    (edited / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer file is missing"):
        verify_main([str(edited)])


def test_a_tokenizer_of_the_same_size_from_elsewhere_is_refused_by_its_sha256(tokens, tmp_path):
    """The same vocab_size and eos_id, the characters in another order: every token would decode as another
    character. format_version 3 manifests (no sha256) are still read, unchecked; a 4 without one is refused."""
    import shutil

    edited = shutil.copytree(tokens, tmp_path / "edited")
    saved = json.loads((edited / "tokenizer.json").read_text())
    (edited / "tokenizer.json").write_text(json.dumps({**saved, "chars": saved["chars"][::-1]}))
    with pytest.raises(DataError, match="tokenizer.json: does not match the tokenizer sha256 in manifest.json"):
        Dataset(edited).copy_tokenizer_to(tmp_path / "run" / "tokenizer")
    with pytest.raises(DataError, match="does not match the tokenizer sha256"):
        verify_main([str(edited)])
    manifest = json.loads((edited / "manifest.json").read_text())
    assert manifest["format_version"] == 4
    del manifest["tokenizer"]["sha256"]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="tokenizer.sha256 is missing"):
        Dataset(edited)
    (edited / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    assert Dataset(edited).tokenizer.decode([0]) == saved["chars"][-1]  # a version-3 dataset: read as it is


def test_an_edited_token_dtype_is_refused_at_the_first_read(tokens, tmp_path):
    """uint16 shards read as uint32 used to end in an IndexError inside the loader."""
    import shutil

    edited = shutil.copytree(tokens, tmp_path / "edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    (edited / "manifest.json").write_text(json.dumps({**manifest, "token_dtype": "uint32"}))
    with pytest.raises(DataError, match=r"train-\d+.tar: its members hold .* tokens of 4 bytes"):
        next(TrainLoader(edited, 16, 2))
    with pytest.raises(DataError, match="shards failed"):
        verify_main([str(edited)])


def test_pretraining_refuses_a_chat_dataset_by_its_kind(tokens, tmp_path):
    """It used to say "22 usable tokens, fewer than block_size+1" or "the manifest records no max_token"."""
    chat = chat_dataset(tmp_path / "chat", tokens, [conversation("To be, or not", "Whether")] * 4)
    with pytest.raises(DataError, match="a dataset of kind 'chat'; pre-training reads kind 'tokens'.*sft"):
        TrainLoader(chat, 16, 2)
    with pytest.raises(DataError, match="kind 'chat'"):
        EvalWindows(chat, "val", 16)


def test_a_split_too_small_for_the_block_is_named(tokens):
    with pytest.raises(DataError, match="split val has .* usable tokens, fewer than block_size"):
        EvalWindows(tokens, "val", 10_000)


def test_a_val_split_too_small_for_the_block_stops_a_run_before_it_writes(tokens, tmp_path):
    """At start-up, not at the first evaluation after train.eval_interval steps of training."""
    from helpers import CPU_CONFIG, tiny_overrides

    from megagpt.config import load_config
    from megagpt.train import train

    cfg = load_config(CPU_CONFIG, tiny_overrides(tokens, max_steps=1, micro_batch_size=1, model_block_size=1024))
    with pytest.raises(DataError, match="split val has .* usable tokens, fewer than block_size"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_skip_mode_with_no_good_val_shard_stops_a_run_before_it_writes(tokens, tmp_path):
    """data.on_corrupt_shard=skip covers the val split: its damage is found at start-up, not at the first
    evaluation after train.eval_interval steps (when skip did not apply to it)."""
    import shutil

    from helpers import CPU_CONFIG, tiny_overrides

    from megagpt.config import load_config
    from megagpt.train import train

    damaged = shutil.copytree(tokens, tmp_path / "damaged")
    for shard in damaged.glob("val-*.tar"):
        shard.write_bytes(b"garbage")
    cfg = load_config(CPU_CONFIG, [*tiny_overrides(damaged, max_steps=1), "data.on_corrupt_shard=skip"])
    with pytest.raises(DataError, match="split val has 0 usable tokens"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- megagpt bench data


@pytest.mark.parametrize("flags, named", [(["--corpus-mb", "nan"], "--corpus-mb nan"),
                                          (["--workers", "0"], "--workers 0"), (["--repeat", "0"], "--repeat 0"),
                                          (["--batches", "0"], "--batches 0"), (["--scale", "--sizes", "0"],
                                                                                "--sizes 0")])
def test_bench_data_refuses_out_of_range_numbers_before_measuring(flags, named, tmp_path):
    with pytest.raises(UserError, match=named):
        bench_data([*flags, "--out", str(tmp_path / "b.json"), "--work-dir", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_bench_data_refuses_a_work_dir_that_is_a_file_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="^--work-dir .*file: is a file; give a folder"):
        bench_data(["--out", str(tmp_path / "b.json"), "--work-dir", str(tmp_path / "file")])


def test_bench_data_names_its_own_flag_when_the_corpus_is_too_small_for_sentencepiece(tmp_path):
    # prep's own advice would name --vocab-size, which bench data does not have
    with pytest.raises(UserError, match=r"^--corpus-mb 0.01: too little text for sentencepiece's 4096 pieces"):
        bench_data(["--corpus-mb", "0.01", "--kinds", "sentencepiece", "--workers", "1", "--repeat", "1",
                    "--out", str(tmp_path / "b.json"), "--work-dir", str(tmp_path / "work")])


def test_bench_data_refuses_an_out_it_could_not_write_before_measuring(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path, tmp_path / "file" / "b.json"):
        with pytest.raises(UserError, match="--out"):
            bench_data(["--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()

