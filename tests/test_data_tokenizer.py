"""megagpt.tokenizer: char round trip and vocabulary."""

import json
import re
import tarfile

import numpy as np
import pytest

import data_prep
from data_prep.prep import PrepSettings, prepare
from megagpt.dataset import load_tokenizer
from megagpt.errors import UserError
from megagpt.tokenizer import CharTokenizer


def test_char_round_trip_on_shakespeare(shakespeare_path, tmp_path):
    text = shakespeare_path.read_text()
    tok = load_tokenizer(data_prep.prepare_shakespeare(tmp_path / "sh", shakespeare_path))
    assert tok.kind == "char" and tok.vocab_size == 65 and tok.eos_id is None
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("\nA a") == [sorted(set(text)).index(c) for c in "\nA a"]


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text_chars(set("abc"), several_documents=False)
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")


TRICKY = ["  two leading spaces", "trailing   ", "tab\there\t\tand\tthere", "\n\nnewlines\n\n\n",
          "mixed \t \n \r\n end", "unicode: γάμμα ηλ épée 日本語 🙂", "unseen: ∑ ∂ ☃ 𝔘", "", " ", "12345 678"]


def _sp_dataset(tmp_path, model_type="bpe"):
    rng = np.random.default_rng(0)  # a fixed corpus: a random one can leave unigram short of 300 pieces
    words = ["the ", "quick", " brown", "γάμμα", "\t", "   ", "\n", "épée", "日本", "fox.", "99"]
    docs = ["".join(rng.choice(words, 300)) for _ in range(6)]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    settings = PrepSettings(tokenizer="sentencepiece", vocab_size=300, model_type=model_type,
                            val_fraction=0.0, shard_size_mb=0.01, sample_tokens=500)
    return prepare([tmp_path / "docs.jsonl"], tmp_path / f"ds_{model_type}", settings), docs


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trips_whitespace_and_unicode(tmp_path, model_type):
    out, docs = _sp_dataset(tmp_path, model_type)
    tok = load_tokenizer(out)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 300 and tok.eos_id is not None
    for text in TRICKY + docs:
        assert tok.decode(tok.encode(text)) == text
        if model_type == "bpe":  # line-by-line encoding is exactly whole-text encoding
            assert tok.encode(text) == tok.sp.encode(text)
    assert len(tok.encode("\t\n")) == 2  # tab and newline are pieces of their own


def test_sentencepiece_decode_drops_ids_past_its_vocabulary(tmp_path):
    """A model's vocabulary padded past the tokenizer's (gpt3_base.yaml: 50304) samples those ids too: decoded
    as nothing, like a char vocabulary, not an IndexError that ended the run at its first evaluation sample."""
    tok = load_tokenizer(_sp_dataset(tmp_path)[0])
    ids = tok.encode("the quick brown fox.")
    assert tok.decode([*ids[:2], tok.vocab_size, *ids[2:], tok.vocab_size + 40]) == "the quick brown fox."


def test_sentencepiece_shards_hold_the_documents_separated_by_eos(tmp_path):
    out, docs = _sp_dataset(tmp_path)
    tok = load_tokenizer(out)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = []
    for k in range(manifest["splits"]["train"]["shards"]):  # shards are named by their position
        with tarfile.open(out / f"train-{k:06d}.tar") as tar:
            tokens += [np.frombuffer(tar.extractfile(m).read(), "<u2") for m in tar]
    tokens = np.concatenate(tokens).tolist()
    pieces, current = [], []
    for t in tokens:
        if t == tok.eos_id:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    pieces.append(current)
    assert [tok.decode(p) for p in pieces] == docs


def _sp_prep(tmp_path, vocab_size, **kw):
    """Sentencepiece prep of a fixed small text (every character common, so any coverage keeps them all)."""
    text = tmp_path / "text.txt"
    if not text.exists():
        rng = np.random.default_rng(7)
        words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "épée", "wörld"]
        text.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)))
    settings = PrepSettings(tokenizer="sentencepiece", vocab_size=vocab_size, shard_size_mb=0.01, **kw)
    return prepare([text], tmp_path / f"ds{vocab_size}", settings), text


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_a_vocab_too_small_for_the_characters_asks_for_the_size_that_works_and_leaves_nothing(tmp_path,
                                                                                            byte_fallback):
    with pytest.raises(UserError) as caught:
        _sp_prep(tmp_path, 20, byte_fallback=byte_fallback)
    message, text = str(caught.value), (tmp_path / "text.txt").read_text()
    need = len(set(text) - {"\n"}) + 4 + 256 * byte_fallback  # characters, <unk> <eos> \n \t, bytes
    assert f"--vocab-size 20 is too small for the {need} pieces" in message
    assert f"pass --vocab-size {need} or more" in message and "smaller --vocab-size" not in message
    assert ("--no-byte-fallback" in message) == byte_fallback and "character_coverage" not in message
    assert sorted(q.name for q in tmp_path.iterdir()) == ["text.txt"]  # no ds20.partial left behind
    out, _ = _sp_prep(tmp_path, need, byte_fallback=byte_fallback)  # the advice works
    assert load_tokenizer(out).vocab_size == need


def test_a_vocab_larger_than_the_text_yields_asks_for_a_smaller_one(tmp_path):
    with pytest.raises(UserError, match=r"--vocab-size 5000 is more pieces than this text yields \((\d+) at most\): "
                                        r"pass --vocab-size \1 or less") as caught:
        _sp_prep(tmp_path, 5000)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["text.txt"]
    most = int(re.search(r"\((\d+) at most", str(caught.value))[1])
    assert load_tokenizer(_sp_prep(tmp_path, most)[0]).vocab_size == most


def test_character_coverage_outside_what_sentencepiece_accepts_is_refused_in_our_flag_name(tmp_path):
    with pytest.raises(UserError, match=r"--character-coverage 0.9: sentencepiece accepts 0.98 to 1"):
        _sp_prep(tmp_path, 300, character_coverage=0.9)
