"""Tokenizers of a dataset dir: the char vocabulary (tokenizer.json), sentencepiece (tokenizer.model), a Hugging
Face `tokenizers` file (tokenizer.json of a GPT-2 folder), and named special tokens appended after any of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from megagpt.errors import UserError

CHAR_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One id per character of a sorted vocabulary (as in "Let's build GPT"); EOS, if any, is the last id.

    The EOS id is only reserved when the corpus holds several documents; it decodes to "" so that
    decode(encode(text)) == text for any text made of known characters.
    """

    kind = "char"

    def __init__(self, chars: list[str], eos_id: int | None = None):
        self.chars = list(chars)
        self.eos_id = eos_id
        self.vocab_size = len(self.chars) + (eos_id is not None)
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # Dense code point -> id table: one vectorised lookup per encode instead of a dict lookup per char.
        self._table = np.full(int(codes.max(initial=0)) + 2, -1, dtype=np.int32)
        self._table[codes] = np.arange(len(codes), dtype=np.int32)

    @classmethod
    def from_text_chars(cls, chars: set[str], several_documents: bool) -> CharTokenizer:
        ordered = sorted(chars)
        return cls(ordered, len(ordered) if several_documents else None)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as an int32 array; raises ValueError naming the first character not in the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        clipped = np.minimum(codes, len(self._table) - 1)  # the table's last slot is always -1
        ids = self._table[clipped]
        if ids.size and ids.min() < 0:
            bad = text[int(np.argmax(ids < 0))]
            raise ValueError(f"character {bad!r} is not in the char tokenizer's vocabulary "
                             f"({len(self.chars)} chars)")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if i < n)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"kind": "char", "chars": self.chars, "eos_id": self.eos_id},
                                   ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        data = json.loads(path.read_text(encoding="utf-8"))
        chars = data.get("chars") if isinstance(data, dict) else None
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError('"chars" must be a list of single characters')
        if len(set(chars)) != len(chars):
            raise ValueError('"chars" lists a character twice')
        eos_id = data.get("eos_id")
        if eos_id is not None and (type(eos_id) is not int or eos_id != len(chars)):
            raise ValueError(f'"eos_id" {eos_id!r}: must be null or {len(chars)} (one past the characters)')
        return cls(chars, eos_id)


class SentencePieceTokenizer:
    """A trained sentencepiece model (BPE or unigram); byte fallback makes every UTF-8 text encodable."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        self.eos_id = eos if eos >= 0 else None
        newline = self.sp.piece_to_id("\n")
        self._newline_id = newline if self.sp.id_to_piece(newline) == "\n" else None

    def encode_array(self, text: str) -> np.ndarray:
        """Line by line ("\n" is a piece of its own): ~2x faster than one call on the whole text, and the
        same ids for BPE (unigram may segment a line's edges differently). One thread: prep workers scale."""
        if self._newline_id is None or "\n" not in text:
            return np.asarray(self.sp.encode(text, out_type=int), dtype=np.int32)
        lines = self.sp.encode(text.split("\n"), out_type=int, num_threads=1)
        ids = [self._newline_id] * (len(lines) - 1 + sum(map(len, lines)))
        pos = 0
        for line in lines:  # line ids, with the newline id left in place between lines
            ids[pos:pos + len(line)] = line
            pos += len(line) + 1
        return np.asarray(ids, dtype=np.int32)

    def encode(self, text: str) -> list[int]:  # the same path as prep, so prompts tokenize like training data
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """Ids past the vocabulary (a model's padded rows: gpt3_base.yaml's 50304) are dropped, as CharTokenizer
        and `tokenizers` drop them; sentencepiece raised IndexError, and a run's evaluation sample ended it."""
        return self.sp.decode([int(i) for i in ids if int(i) < self.vocab_size])

    def __getstate__(self):  # picklable for worker processes: the model is re-read from its file
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` file (the tokenizer.json of a GPT-2 folder): byte-level BPE, any text encodes."""

    kind = "huggingface"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise UserError(f"{path}: reading a Hugging Face tokenizer needs the `tokenizers` package "
                            f"(pip install tokenizers)") from None
        self.path = Path(path)
        self.hf = _HFTokenizer.from_file(str(path))
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.hf.token_to_id("<|endoftext|>")

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class WithSpecialTokens:
    """A base tokenizer plus named special tokens with the ids right after its vocabulary (in the order given).

    Text never encodes to them (encode is the base's), and decode drops them, so decode(encode(text)) == text as
    before; code that builds a chat template places them by id. The names and ids are recorded in the dataset
    manifest's `special_tokens`; a model whose vocabulary lacks them grows embedding rows (megagpt/init_from.py).
    """

    def __init__(self, base: Tokenizer, special_tokens: dict[str, int]):
        expected = {name: base.vocab_size + i for i, name in enumerate(special_tokens)}
        if dict(special_tokens) != expected:
            raise UserError(f"special tokens {dict(special_tokens)} do not follow the base vocabulary of "
                            f"{base.vocab_size} ids in order (expected {expected})")
        self.base = base
        self.special_tokens = dict(special_tokens)
        self.base_vocab_size = base.vocab_size
        self.vocab_size = base.vocab_size + len(special_tokens)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.base.encode_array(text), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids) -> str:
        return self.base.decode([int(i) for i in ids if int(i) < self.base_vocab_size])

    def __getattr__(self, name):  # kind, eos_id, chars, ...: the base's (never during unpickling's setup)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def with_special_tokens(tokenizer: Tokenizer, special_tokens: dict[str, int]) -> Tokenizer:
    """The tokenizer as it is when there are no special tokens, else wrapped by WithSpecialTokens."""
    return WithSpecialTokens(tokenizer, special_tokens) if special_tokens else tokenizer


def tokenizer_from_file(kind: str, path: str | Path) -> Tokenizer:
    """The tokenizer of `kind` (char | sentencepiece | huggingface) stored in `path`; a one-line UserError otherwise."""
    path = Path(path)
    if kind not in ("char", "sentencepiece", "huggingface"):
        raise UserError(f"{path}: unknown tokenizer kind {kind!r} (expected 'char', 'sentencepiece' or "
                        f"'huggingface')")
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file is missing")
    classes = {"char": CharTokenizer.load, "sentencepiece": SentencePieceTokenizer,
               "huggingface": HuggingFaceTokenizer}
    # The `tokenizers` library raises plain Exceptions for a file it cannot parse.
    errors = (Exception,) if kind == "huggingface" else (OSError, ValueError, KeyError, RuntimeError)
    try:
        return classes[kind](path)
    except UserError:
        raise
    except errors as e:
        raise UserError(f"{path}: not a readable {kind} tokenizer ({e})") from None
