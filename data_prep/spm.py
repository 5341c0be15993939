"""Sentencepiece training on a seeded sample of the corpus bounded in lines and characters; settings that
round-trip any UTF-8; its failures as advice in megagpt's flags."""

from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path

from data_prep.sources import iter_chunks
from megagpt.errors import UserError

MAX_LINE_CHARS = 4000  # sentencepiece drops longer "sentences" (max_sentence_length is in bytes)
MIN_VOCAB = 5  # <unk>, </s>, the "\n" and "\t" pieces, one character: below it the trainer fails unexplained


def sample_lines(paths: list, text_field: str, chunk_chars: int, sample_size: int, seed: int,
                 sample_chars: int = 100_000_000) -> list[str]:
    """Up to sample_size lines (cut at MAX_LINE_CHARS) drawn uniformly from the whole corpus by reservoir
    sampling, and at most sample_chars characters in all: memory bounded by the sample, not the corpus. Once
    the character budget binds, the reservoir stops growing and a replacement that would exceed it is skipped
    (a slight bias toward shorter lines, only for corpora whose sample would not fit)."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = chars = 0
    capacity = sample_size
    for chunk in iter_chunks(paths, text_field, chunk_chars):
        for text, _ in chunk:
            for line in text.split("\n"):
                for i in range(0, len(line), MAX_LINE_CHARS):
                    piece = line[i:i + MAX_LINE_CHARS]
                    seen += 1
                    if len(reservoir) < capacity:
                        if chars + len(piece) > sample_chars:
                            capacity = len(reservoir)
                        else:
                            reservoir.append(piece)
                            chars += len(piece)
                        continue
                    j = rng.randrange(seen)
                    if j < capacity and chars - len(reservoir[j]) + len(piece) <= sample_chars:
                        chars += len(piece) - len(reservoir[j])
                        reservoir[j] = piece
    return reservoir


def train_sentencepiece(paths: list[Path], settings, model_path: Path) -> None:
    """Train into model_path. Identity normalization, no whitespace folding, byte fallback: lossless."""
    import sentencepiece as spm

    lines = sample_lines(paths, settings.text_field, settings.chunk_chars, settings.sample_size,
                         settings.seed, settings.sample_chars)
    if not any(lines):
        raise UserError("the inputs contain no text to train sentencepiece on")
    model = io.BytesIO()  # not a model_prefix: the model would record that (temporary) path
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=settings.model_type,
            vocab_size=settings.vocab_size,
            character_coverage=settings.character_coverage,
            byte_fallback=settings.byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # chunks are encoded separately: no invented leading space per chunk
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n", "\t"],  # never seen in the line sample, yet common in the corpus
            unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
            max_sentence_length=4 * MAX_LINE_CHARS,
            input_sentence_size=0,  # the sample above is already bounded
            shuffle_input_sentence=False,
            num_threads=settings.threads or os.cpu_count() or 1,
            seed_sentencepiece_size=1_000_000,
            minloglevel=2,
            hard_vocab_limit=True,
        )
    except RuntimeError as e:
        raise training_error(str(e), settings) from None
    model_path.write_bytes(model.getvalue())


def training_error(message: str, settings) -> UserError:
    """The trainer's failure as one line of advice: a --vocab-size too small for the pieces it must hold (every
    character of the coverage, the special tokens, the 256 bytes of --byte-fallback) needs a larger one; one
    larger than the text yields needs a smaller one or more text. Anything else as sentencepiece says it."""
    if small := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        vocab, need = int(small[1]), int(small[2])
        held = "its characters, the special tokens" + (", 256 byte pieces" if settings.byte_fallback else "")
        fixes = [f"--vocab-size {need} or more"]
        if settings.byte_fallback:
            fixes.append("--no-byte-fallback (256 pieces fewer; characters outside the vocabulary become <unk>)")
        if settings.character_coverage > 0.98 and vocab > 256 * settings.byte_fallback:
            fixes.append(f"a lower --character-coverage than {settings.character_coverage} (0.98 at least)")
        return UserError(f"--vocab-size {vocab} is too small for the {need} pieces this text needs ({held}): "
                         f"pass {', or '.join(fixes)}")
    if large := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message):
        return UserError(f"--vocab-size {large[1]} is more pieces than this text yields ({large[2]} at most): "
                         f"pass --vocab-size {large[2]} or less, or more text (--input, --sample-size, --sample-chars)")
    return UserError(f"sentencepiece training failed: {message}")
