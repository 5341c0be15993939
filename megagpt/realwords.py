"""The demo's preference, a rule anyone can check: the fraction of a reply's words that are real words, i.e. occur
in Tiny Shakespeare's training text (its first 90%, the pre-training train split).

Words (docs/alignment.md says the same):
  * a word is a maximal run of ASCII letters, with apostrophes allowed inside it ("o'er", "thou'rt"; the
    apostrophe of "'tis" is not inside, so that word is "tis"), compared lower-cased: "Romeo", "ROMEO" and "romeo"
    are one word;
  * digits, punctuation, hyphens and spaces separate words and are not words ("well-a-day" is three words);
  * the vocabulary is every word of the training text, so a word counts as real if Shakespeare used it there;
  * the score of a reply is (its words found in the vocabulary) / (its words), in [0, 1];
  * a reply with no word at all (empty, or only punctuation) scores 0: saying nothing is not a way to win.
The vocabulary is written once, one word per line, sorted (`words.txt` in the preference data dir that
`megagpt prep shakespeare-prefs` writes), so that scoring needs neither the corpus nor data_prep.
"""

from __future__ import annotations

import re
from pathlib import Path

from megagpt.errors import UserError

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
WORDS_FILE = "words.txt"


def words(text: str) -> list[str]:
    """The words of a text, lower-cased, in order."""
    return [w.lower() for w in WORD.findall(text)]


def vocabulary(text: str) -> set[str]:
    return set(words(text))


def real_word_rate(reply: str, known: set[str]) -> float:
    """The fraction of the reply's words found in `known`; 0 for a reply without words."""
    found = words(reply)
    if not found:
        return 0.0
    return sum(w in known for w in found) / len(found)


def save_vocabulary(known: set[str], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(f"{w}\n" for w in sorted(known)), encoding="utf-8")
    return path


def load_vocabulary(path: str | Path) -> set[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no word list here; `megagpt prep shakespeare-prefs` writes it")
    return {line for line in path.read_text(encoding="utf-8").splitlines() if line}
