"""The chat template: the special tokens, a conversation -> token ids + loss mask, truncation, and back to text.

A conversation is a list of messages {"role": "system"|"user"|"assistant", "content": str}: an optional system
message first, then user and assistant alternating, starting with the user and ending with the assistant.
Each message becomes  <|role|> content <|end|>  with one begin token per role and one end-of-turn token:

    <|system|> Be brief. <|end|> <|user|> Who says: ... <|end|> <|assistant|> ROMEO <|end|>
    mask:    0 ...               0 ...                          0             1 ... 1

The loss mask is 1 exactly on the assistant's content and the <|end|> after it: the model learns to answer and
to stop, never to imitate the user. The special tokens take the ids after the base vocabulary, in CHAT_TOKENS
order (megagpt/tokenizer.py WithSpecialTokens); text never encodes to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megagpt.errors import UserError

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class ConversationError(UserError):
    """A conversation that breaks the template's rules; the caller adds the file and line."""


def check_messages(messages, final_role: str | None = "assistant") -> list[tuple[str, str]]:
    """(role, content) pairs of a valid conversation, or a ConversationError saying what is wrong.

    final_role: the role the conversation must end with ("assistant" for training data, "user" for a prompt
    that asks for the next reply, None for either)."""
    if not isinstance(messages, list):
        raise ConversationError(f"expected a list of messages, found {type(messages).__name__} {messages!r:.40}")
    if not messages:
        raise ConversationError("empty conversation (\"messages\" must be a non-empty list)")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ConversationError(f"message {i}: expected {{\"role\": ..., \"content\": \"text\"}}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLE_TOKENS:  # a list or dict role is unhashable
            raise ConversationError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
        pairs.append((role, message["content"]))
    turns = pairs[1:] if pairs[0][0] == "system" else pairs
    if not turns:
        raise ConversationError("empty conversation (only a system message)")
    offset = len(pairs) - len(turns)
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(f"message {i + offset}: roles out of order ({role} where {expected} was "
                                    f"expected: [system], then user and assistant alternating)")
    if final_role is not None and turns[-1][0] != final_role:
        raise ConversationError(f"roles out of order: the conversation ends with the {turns[-1][0]}'s message, "
                                f"expected the {final_role}'s")
    return pairs


def chat_token_ids(tokenizer) -> dict[str, int] | None:
    """The ids of CHAT_TOKENS in this tokenizer, or None for a tokenizer without them (a base model's)."""
    special = getattr(tokenizer, "special_tokens", {}) or {}
    if not all(name in special for name in CHAT_TOKENS):
        return None
    return {name: special[name] for name in CHAT_TOKENS}


def require_chat_tokens(tokenizer) -> dict[str, int]:
    ids = chat_token_ids(tokenizer)
    if ids is None:
        raise UserError(f"the tokenizer has no chat tokens ({', '.join(CHAT_TOKENS)}); prepare the data with "
                        f"`megagpt prep chat`")
    return ids


@dataclass
class Encoded:
    """A conversation's token ids, its loss mask, and the token counts after each assistant turn."""

    ids: np.ndarray  # int64
    mask: np.ndarray  # uint8, 1 on assistant content and its <|end|>
    turn_ends: list[int]  # len(ids) after each assistant turn: the places where a truncation keeps whole turns


def encode_conversation(tokenizer, pairs: list[tuple[str, str]], encode=None) -> Encoded:
    """Token ids and loss mask of checked (role, content) pairs; `encode(text)` defaults to tokenizer.encode."""
    special = require_chat_tokens(tokenizer)
    encode = encode or tokenizer.encode
    ids: list[int] = []
    mask: list[int] = []
    turn_ends = []
    for role, content in pairs:
        body = [*encode(content), special[END]]
        learn = int(role == "assistant")
        ids += [special[ROLE_TOKENS[role]], *body]
        mask += [0] + [learn] * len(body)
        if learn:
            turn_ends.append(len(ids))
    return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8), turn_ends)


def truncate(encoded: Encoded, max_length: int) -> tuple[Encoded | None, str | None]:
    """At most max_length tokens: whole turns where an assistant turn fits, else cut inside the first one.

    Returns (the conversation or None when nothing learnable is left, what happened: None | "turn" | "cut" |
    "dropped")."""
    n = len(encoded.ids)
    if n <= max_length:
        return encoded, None
    fitting = [end for end in encoded.turn_ends if end <= max_length]
    if fitting:
        end = fitting[-1]
        return Encoded(encoded.ids[:end], encoded.mask[:end], fitting), "turn"
    if encoded.mask[:max_length].any():
        return Encoded(encoded.ids[:max_length], encoded.mask[:max_length], []), "cut"
    return None, "dropped"


def prompt_ids(tokenizer, pairs: list[tuple[str, str]]) -> list[int]:
    """A conversation that ends with the user's message, then <|assistant|>: the model's reply comes next."""
    special = require_chat_tokens(tokenizer)
    ids: list[int] = []
    for role, content in pairs:
        ids += [special[ROLE_TOKENS[role]], *tokenizer.encode(content), special[END]]
    return ids + [special[ASSISTANT]]


def render(tokenizer, ids) -> str:
    """Token ids with chat tokens as readable text: one "role: content" line per turn (for samples and logs)."""
    special = chat_token_ids(tokenizer) or {}
    names = {i: name for name, i in special.items()}
    roles = {ROLE_TOKENS[r]: r for r in ROLE_TOKENS}
    out, run = [], []
    for i in [int(t) for t in ids]:
        if i not in names:
            run.append(i)
            continue
        out.append(tokenizer.decode(run))
        run = []
        name = names[i]
        out.append(f"{roles[name]}: " if name in roles else "\n")
    out.append(tokenizer.decode(run))
    return "".join(out)
