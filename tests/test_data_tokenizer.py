"""megagpt.tokenizer: char round trip and vocabulary."""

import pytest

import data_prep
from megagpt.tokenizer import CharTokenizer, load_tokenizer


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
