"""`megagpt chat`: talk to a fine-tuned model (one reply with --prompt, or an interactive terminal session).

Replies are sampled token by token with a KV cache and stop at the end-of-turn token (or --max-new-tokens). The
interactive session keeps the conversation; when it outgrows the model's block_size the oldest exchanges are
dropped (the system message stays). /reset starts over, /quit (or end of input) leaves. A model that was never
fine-tuned (its tokenizer has no chat tokens) gets a one-line notice and continues the text as a completer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megagpt.chat_template import END, chat_token_ids, check_messages, prompt_ids
from megagpt.errors import UserError
from megagpt.generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, draw_token, sampling_probabilities
from megagpt.generate import prompt_ids as text_ids
from megagpt.model import KVCache

HELP = "talk to a fine-tuned model from a run dir or an export dir"


# ---------------------------------------------------------------- replies, token by token


@torch.no_grad()
def stream_reply(model, prompt: list[int], stop_id: int | None, max_new_tokens: int,
                 temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = DEFAULT_TOP_K,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
    """The next tokens after `prompt`, one at a time, up to and including stop_id (or max_new_tokens of them).

    With a KV cache while the sequence fits block_size; past it (learned positions shift) each step recomputes
    the last block_size tokens, as megagpt/generate.py does."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.cfg.block_size
    seq = list(prompt)
    cache = KVCache(model.cfg.n_layer)
    logits, _ = model(torch.tensor([seq[-block:]], device=device), cache=cache)
    try:
        for _ in range(max_new_tokens):
            token = _pick(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            yield token
            if token == stop_id:
                return
            seq.append(token)
            if cache is not None and len(seq) <= block:
                logits, _ = model(torch.tensor([[token]], device=device), cache=cache)
            else:
                cache = None
                logits, _ = model(torch.tensor([seq[-block:]], device=device))
    finally:
        model.train(was_training)


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> int:
    return draw_token(sampling_probabilities(logits, temperature, top_k, top_p), temperature, generator)


@dataclass
class Reply:
    ids: list[int]  # without the end-of-turn token
    stopped: bool  # ended with the end-of-turn token within max_new_tokens


def generate_reply(model, prompt: list[int], stop_id: int | None, max_new_tokens: int,
                   on_token: Callable[[list[int]], None] | None = None, **sampling) -> Reply:
    """The whole reply; on_token(ids so far) after each token (streaming)."""
    ids: list[int] = []
    for token in stream_reply(model, prompt, stop_id, max_new_tokens, **sampling):
        if token == stop_id:
            return Reply(ids, True)
        ids.append(token)
        if on_token is not None:
            on_token(ids)
    return Reply(ids, False)


# ---------------------------------------------------------------- a conversation that fits the model


class Session:
    """A conversation with the model: the history of exchanges, trimmed to fit block_size."""

    def __init__(self, model, tokenizer, system: str | None, max_new_tokens: int, generator, **sampling):
        self.model, self.tokenizer = model, tokenizer
        self.special = chat_token_ids(tokenizer)
        self.system = system
        self.max_new_tokens, self.generator, self.sampling = max_new_tokens, generator, sampling
        self.history: list[tuple[str, str]] = []  # (user, assistant) exchanges
        block = model.cfg.block_size
        self.budget = max(block - max_new_tokens, block // 2)  # prompt tokens that leave room for the reply

    def reset(self) -> None:
        self.history = []

    def prompt(self, message: str) -> list[int]:
        """The conversation so far plus `message`, oldest exchanges dropped until it fits the budget."""
        exchanges = list(self.history)
        while True:
            pairs = [("system", self.system)] if self.system else []
            for user, assistant in exchanges:
                pairs += [("user", user), ("assistant", assistant)]
            pairs.append(("user", message))
            ids = prompt_ids(self.tokenizer, check_messages([{"role": r, "content": c} for r, c in pairs],
                                                            final_role="user"))
            if len(ids) <= self.budget or not exchanges:
                return ids[-self.budget:] if len(ids) > self.model.cfg.block_size else ids
            exchanges.pop(0)

    def ask(self, message: str, on_token=None) -> Reply:
        if self.special is None:  # a completer: the text continues
            return generate_reply(self.model, text_ids(self.tokenizer, message), None, self.max_new_tokens,
                                  on_token, generator=self.generator, **self.sampling)
        reply = generate_reply(self.model, self.prompt(message), self.special[END], self.max_new_tokens, on_token,
                               generator=self.generator, **self.sampling)
        self.history.append((message, self.tokenizer.decode(reply.ids)))
        return reply


# ---------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt chat", description=HELP)
    p.add_argument("path", help="RUN_DIR or EXPORT_DIR of a fine-tuned model (train.stage sft, dpo or ppo); a "
                   "model never fine-tuned continues the text as a completer")
    p.add_argument("--prompt", help="ask once: print the reply alone and exit")
    p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help=">= 0; 0: greedy")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=">= 1")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--step", type=int, help="checkpoint step of a run dir (default: latest)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def main(argv: list[str]) -> int:
    from megagpt.inference import load_for_inference
    from megagpt.sample import check_sampling_args, resolve_device

    args = parser().parse_args(argv)
    check_sampling_args(1, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_inference(args.path, args.step, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    session = Session(model, tokenizer, args.system, args.max_new_tokens, generator,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if session.special is None:
        print(f"megagpt chat: {args.path} was never fine-tuned for chat (its tokenizer has no chat tokens): it "
              f"continues your text as a document completer{'; --system is ignored' if args.system else ''}",
              file=sys.stderr)
    if args.prompt is not None:
        reply = _ask(session, args.prompt, "--prompt")
        sys.stdout.write(tokenizer.decode(reply.ids) + "\n")
        return 0
    return interactive(session, sys.stdin, sys.stdout)


def _ask(session: Session, message: str, where: str, on_token=None) -> Reply:
    try:
        return session.ask(message, on_token)
    except ValueError as e:  # a character outside a char vocabulary
        raise UserError(f"{where}: {e}") from None


def interactive(session: Session, stdin, stdout) -> int:
    """Read a message per line, stream the reply; /reset, /quit, end of input."""
    stdout.write("megagpt chat: type a message; /reset starts over, /quit leaves\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            stdout.write("\n" if not line else "")
            return 0
        message = line.rstrip("\r\n")
        if message.strip() == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        if not message.strip():
            continue
        stdout.write("bot> ")
        printer = _Printer(session.tokenizer, stdout)
        try:
            _ask(session, message, "message", printer)
        except UserError as e:
            stdout.write(f"\nmegagpt chat: error: {e}\n")
            continue
        stdout.write("\n")


class _Printer:
    """Writes each new piece of the decoded reply as it grows (a byte-level piece may wait for the next)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.shown = tokenizer, out, ""

    def __call__(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text
