"""`megagpt chat`: a seeded reply that stops at end-of-turn, the interactive session through a real pseudo-terminal
(history, /reset, /quit), history trimmed from the oldest exchange, a base model's notice, one-line errors."""

import os
import select
import subprocess
import sys
import time

import pytest
import torch
from chat_helpers import chat_dataset, chat_prompt, pretrain_overrides, reference_reply, sft_overrides, train_run
from dist_helpers import child_env
from helpers import REPO

from megagpt.chat import Session
from megagpt.chat_template import END
from megagpt.cli import main as megagpt
from megagpt.inference import load_for_inference


@pytest.fixture(scope="module")
def runs(shakespeare_dataset, tmp_path_factory):
    """trained: fine-tuned until it answers the toy questions and stops; early: 8 steps in, its greedy replies
    still change with every token of the history; base: pre-trained only."""
    root = tmp_path_factory.mktemp("chat")
    data = chat_dataset(root / "toy", shakespeare_dataset)
    train_run(root / "trained", sft_overrides(data, max_steps=60, lr=1e-2, checkpoint_interval=60))
    train_run(root / "early", sft_overrides(data, max_steps=8, lr=1e-2, checkpoint_interval=8))
    train_run(root / "base", pretrain_overrides(shakespeare_dataset))
    return root


def chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megagpt", "chat", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=child_env(), timeout=300)


def test_prompt_prints_the_reply_alone_reproducibly_and_stops_at_end_of_turn(runs, capsys):
    first = chat(runs / "trained", "--prompt", "Who is mad?", "--seed", 3, "--max-new-tokens", 40)
    assert first.returncode == 0, first.stderr
    # again, in this process: the seed alone decides the reply, not the state of a fresh interpreter
    assert megagpt(["chat", str(runs / "trained"), "--prompt", "Who is mad?", "--seed", "3", "--max-new-tokens",
                    "40"]) == 0
    assert first.stdout == capsys.readouterr().out
    model, tokenizer, _ = load_for_inference(runs / "trained")
    generator = torch.Generator().manual_seed(3)
    reply, stopped = reference_reply(model, chat_prompt(tokenizer, "Who is mad?"), tokenizer.special_tokens[END],
                                     40, temperature=0.8, generator=generator)
    assert stopped and len(reply) < 40  # it ended its turn itself
    assert first.stdout == tokenizer.decode(reply) + "\n"


def test_an_export_of_the_run_gives_the_same_reply(runs, tmp_path, capsys):
    from megagpt.export import export

    out = export(runs / "trained", tmp_path / "export")
    replies = []
    for path in (runs / "trained", out):
        assert megagpt(["chat", str(path), "--prompt", "Who loves Juliet?", "--seed", "5"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()


class Terminal:
    """A program on the slave side of a real pseudo-terminal; we type on the master side and read its screen."""

    def __init__(self, *argv: str):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=child_env(),
                                     start_new_session=True)
        os.close(slave)
        self.screen = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        start, deadline = len(self.screen), time.monotonic() + timeout
        while len(self.screen) == start or not self.screen.endswith(marker):  # new output, ending with it
            assert time.monotonic() < deadline, f"no {marker!r} on the screen:\n{self.screen[-2000:]}"
            if select.select([self.master], [], [], 0.5)[0]:
                self.screen += os.read(self.master, 4096).decode("utf-8", "replace")
        return self.screen[start:]

    def type(self, line: str) -> str:
        os.write(self.master, (line + "\n").encode())
        return self.read_until("you> ")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_interactive_chat_keeps_history_and_obeys_reset_through_a_terminal(runs):
    term = Terminal(sys.executable, "-m", "megagpt", "chat", str(runs / "early"), "--temperature", "0",
                    "--max-new-tokens", "8")
    term.read_until("you> ")
    replies = []
    for line in ("hi there", "what say you?", "/reset", "what say you?"):
        shown = term.type(line).replace("\r\n", "\n")
        if line == "/reset":
            assert "(conversation cleared)" in shown
            continue
        replies.append(shown.split("bot> ", 1)[1].removesuffix("\nyou> "))
    os.write(term.master, b"/quit\n")
    assert term.close() == 0

    model, tokenizer, _ = load_for_inference(runs / "early")
    end = tokenizer.special_tokens[END]
    first, _ = reference_reply(model, chat_prompt(tokenizer, "hi there"), end, 8)
    history = tokenizer.decode(first)
    second, _ = reference_reply(model, chat_prompt(tokenizer, "hi there", history, "what say you?"), end, 8)
    fresh, _ = reference_reply(model, chat_prompt(tokenizer, "what say you?"), end, 8)
    assert second != fresh  # the model's replies depend on the history: the test can tell the two apart
    assert replies == [history, tokenizer.decode(second), tokenizer.decode(fresh)]


def test_history_is_trimmed_from_the_oldest_exchange_and_keeps_the_system_message(runs):
    model, tokenizer, _ = load_for_inference(runs / "early")
    session = Session(model, tokenizer, "Be brief.", max_new_tokens=100, generator=None, temperature=0.0)
    assert session.budget == model.cfg.block_size // 2  # 128 - 100 leaves less than half: half is kept
    exchanges = [("Who is the prince?", "HAMLET"), ("Who loves Juliet?", "ROMEO"), ("Who is mad?", "LEAR")]
    session.history = list(exchanges)
    got = session.prompt("Who is the moor?")
    for keep in range(len(exchanges), -1, -1):
        turns = [text for pair in exchanges[len(exchanges) - keep:] for text in pair]
        expected = chat_prompt(tokenizer, *turns, "Who is the moor?", system="Be brief.")
        if len(expected) <= session.budget:
            break
    assert 0 < keep < len(exchanges)  # the case at hand drops some exchanges, not all
    assert got == expected


def test_a_model_never_fine_tuned_says_so_and_continues_the_text(runs, capsys):
    assert megagpt(["chat", str(runs / "base"), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "12",
                    "--system", "Be brief."]) == 0
    result = capsys.readouterr()
    notice = [line for line in result.err.splitlines() if "never fine-tuned" in line]
    assert len(notice) == 1 and "document completer" in notice[0] and "--system is ignored" in notice[0]
    model, tokenizer, _ = load_for_inference(runs / "base")
    continuation, _ = reference_reply(model, tokenizer.encode("ROMEO:"), None, 12)
    assert result.out == tokenizer.decode(continuation) + "\n"


@pytest.mark.parametrize("args, message", [(["--temperature", "-1"], "--temperature -1.0"),
                                           (["--top-k", "0"], "--top-k 0"), (["--top-p", "1.5"], "--top-p 1.5"),
                                           (["--max-new-tokens", "0"], "--max-new-tokens 0"),
                                           (["--prompt", "caf\u00e9"], "'\u00e9' is not in the char tokenizer")])
def test_bad_arguments_are_one_line_errors(args, message, runs, capsys):
    code = megagpt(["chat", str(runs / "trained"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err


def test_a_directory_without_a_model_is_a_one_line_error(tmp_path, capsys):
    assert megagpt(["chat", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "neither a run dir" in err
