"""Supervised fine-tuning: the chat template's loss mask, prep chat and its errors, the loader's rows, the sft
stage's loss, evaluation, exact resume, and 2 ranks under ZeRO-2 equal to 1."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chat_helpers import BLOCK, chat_dataset, conversation, pretrain_overrides, sft_overrides, train_run, write_jsonl
from dist_helpers import finish, tiny, torchrun
from helpers import TINY_MODEL, losses, metrics

from data_prep.chat import ChatPrepSettings, prepare_chat
from megagpt.chat_data import ChatLoader, Conversations, to_rows
from megagpt.chat_template import ASSISTANT, CHAT_TOKENS, END, SYSTEM, USER, encode_conversation, truncate
from megagpt.cli import main as megagpt
from megagpt.config import ModelConfig
from megagpt.dataset import Dataset, sha256_file
from megagpt.inference import load_for_inference
from megagpt.model import GPT
from megagpt.stages.sft import masked_loss
from megagpt.tokenizer import CharTokenizer, WithSpecialTokens


@pytest.fixture(scope="module")
def tok():
    base = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ?!.")))
    return WithSpecialTokens(base, {name: base.vocab_size + i for i, name in enumerate(CHAT_TOKENS)})


@pytest.fixture(scope="module")
def toy(shakespeare_dataset, tmp_path_factory):
    """A chat dataset of the toy conversations, on Tiny Shakespeare's char tokenizer."""
    return chat_dataset(tmp_path_factory.mktemp("sft") / "toy", shakespeare_dataset)


@pytest.fixture(scope="module")
def source(shakespeare_dataset, tmp_path_factory):
    """A tiny pre-trained model: the init_from of the fine-tuning runs."""
    run_dir = tmp_path_factory.mktemp("sft") / "base"
    train_run(run_dir, pretrain_overrides(shakespeare_dataset))
    return run_dir


def _parts(tok, *pieces):
    """Expected ids and mask, spelled out: (text or special name, mask bit) pieces."""
    ids, mask = [], []
    for piece, bit in pieces:
        new = [tok.special_tokens[piece]] if piece in tok.special_tokens else tok.encode(piece)
        ids += new
        mask += [bit] * len(new)
    return ids, mask


# ---------------------------------------------------------------- the template's mask


def test_mask_is_one_exactly_on_assistant_content_and_its_end_multi_turn_with_system(tok):
    pairs = [("system", "be brief."), ("user", "hi?"), ("assistant", "yo."), ("user", "who?"), ("assistant", "me")]
    got = encode_conversation(tok, pairs)
    ids, mask = _parts(tok, (SYSTEM, 0), ("be brief.", 0), (END, 0), (USER, 0), ("hi?", 0), (END, 0),
                       (ASSISTANT, 0), ("yo.", 1), (END, 1), (USER, 0), ("who?", 0), (END, 0), (ASSISTANT, 0),
                       ("me", 1), (END, 1))
    assert got.ids.tolist() == ids and got.mask.tolist() == mask
    assert got.turn_ends == [ids.index(tok.special_tokens[USER], 12), len(ids)]  # after each assistant turn


def test_an_empty_assistant_turn_learns_only_its_end_of_turn(tok):
    got = encode_conversation(tok, [("user", "hi"), ("assistant", "")])
    ids, mask = _parts(tok, (USER, 0), ("hi", 0), (END, 0), (ASSISTANT, 0), (END, 1))
    assert got.ids.tolist() == ids and got.mask.tolist() == mask


def test_truncation_keeps_whole_turns_then_cuts_inside_then_drops(tok):
    full = encode_conversation(tok, [("user", "ab"), ("assistant", "cd"), ("user", "ef"), ("assistant", "gh")])
    first_turn = full.turn_ends[0]  # 8 tokens: <u> a b <e> <a> c d <e>
    kept, how = truncate(full, first_turn + 3)
    assert how == "turn" and kept.ids.tolist() == full.ids[:first_turn].tolist()
    assert kept.mask.tolist() == full.mask[:first_turn].tolist()
    exact, how = truncate(full, first_turn)  # the first turn fills max_length exactly: still kept whole
    assert how == "turn" and exact.ids.tolist() == full.ids[:first_turn].tolist()
    cut, how = truncate(full, 6)  # inside the first assistant turn: its first token is still learned
    assert how == "cut" and cut.ids.tolist() == full.ids[:6].tolist() and cut.mask.tolist()[-1] == 1
    assert truncate(full, 5) == (None, "dropped")  # up to <a>: nothing the model would learn
    assert truncate(full, len(full.ids))[1] is None


def test_prep_summary_counts_truncations(shakespeare_dataset, tmp_path):
    records = [conversation("Who?", "ROMEO"), conversation("Who?", "ROMEO", "And?", "JULIET"),
               conversation("Who is it, say?", "HAMLET the Dane"), conversation("A long question here?", "Ay")]
    source = write_jsonl(tmp_path / "c.jsonl", records)
    # 1: 13 tokens, fits; 2: 25 -> its first exchange; 3: cut inside; 4: the question alone is 24 tokens
    _, summary = prepare_chat([source], tmp_path / "out", shakespeare_dataset,
                              ChatPrepSettings(val_fraction=0.0, max_length=20))
    assert (summary.truncated_at_turn, summary.cut_inside_turn, summary.dropped) == (1, 1, 1)
    assert summary.conversations == {"train": 3, "val": 0}
    conversations = Conversations(Dataset(tmp_path / "out"), "train")
    assert [len(conversations[i][0]) for i in range(3)] == [13, 13, 20]


def test_prep_counts_the_lines_it_reads_on_a_terminal_only(shakespeare_dataset, tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    source = write_jsonl(tmp_path / "c.jsonl", [conversation("Who?", "ROMEO")] * 5)
    for out, stderr in (("tty", Terminal()), ("pipe", io.StringIO())):
        monkeypatch.setattr(sys, "stderr", stderr)
        prepare_chat([source], tmp_path / out, shakespeare_dataset, ChatPrepSettings(val_fraction=0.0))
        monkeypatch.undo()
        shown = stderr.getvalue()
        assert ("read c.jsonl" in shown and " lines" in shown) if out == "tty" else shown == "", shown
    assert (tmp_path / "tty" / "manifest.json").read_bytes() == (tmp_path / "pipe" / "manifest.json").read_bytes()


# ---------------------------------------------------------------- prep chat


def test_prep_chat_writes_a_chat_dataset_that_reads_back(toy, shakespeare_dataset):
    dataset = Dataset(toy)
    manifest = dataset.manifest
    base_vocab = Dataset(shakespeare_dataset).vocab_size
    assert manifest.kind == "chat" and manifest.vocab_size == base_vocab + 4
    assert manifest.special_tokens == {name: base_vocab + i for i, name in enumerate(CHAT_TOKENS)}
    assert (toy / "tokenizer.json").read_bytes() == (shakespeare_dataset / "tokenizer.json").read_bytes()
    records = [json.loads(line) for line in (toy.with_name("toy.jsonl")).read_text().splitlines()]
    tokenizer = dataset.tokenizer
    expected = [encode_conversation(tokenizer, [(m["role"], m["content"]) for m in r["messages"]]) for r in records]
    got = [Conversations(dataset, split)[i] for split in ("train", "val")
           for i in range(len(Conversations(dataset, split)))]
    assert len(got) == len(records) and manifest.split("val").samples == round(0.2 * len(records))
    assert sorted((ids.tolist(), mask.tolist()) for ids, mask in got) == \
        sorted((e.ids.tolist(), e.mask.tolist()) for e in expected)


def test_conversations_read_the_same_from_one_shard_or_many(shakespeare_dataset, tmp_path):
    one = Conversations(Dataset(chat_dataset(tmp_path / "one", shakespeare_dataset, val_fraction=0.0)), "train")
    many_dir = chat_dataset(tmp_path / "many", shakespeare_dataset, val_fraction=0.0, shard_size_mb=0.001)
    many = Conversations(Dataset(many_dir), "train")
    assert len(Dataset(many_dir).shards("train")) > 3
    assert len(one) == len(many) > 0
    for i in range(len(one)):
        assert all(np.array_equal(a, b) for a, b in zip(one[i], many[i], strict=True))


BAD = {
    "bad JSON": ('{"messages": [', "not valid JSON"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    "role not a string": ({"messages": [{"role": ["user"], "content": "x"}]}, "unknown role ['user']"),
    "roles out of order": ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order"),
    "two users": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                  "roles out of order"),
    "ends with the user": (conversation("a", "b", "c"), "ends with the user's message"),
    "empty conversation": ({"messages": []}, "empty conversation"),
    "only a system message": ({"messages": [{"role": "system", "content": "x"}]}, "empty conversation"),
    "no messages": ({"text": "x"}, "expected an object"),
    "unknown character": (conversation("caf\u00e9?", "Ay"), "character(s) '\u00e9' not in the char tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversations_are_one_line_errors_naming_file_and_line(case, shakespeare_dataset, tmp_path, capsys):
    record, message = BAD[case]
    source = write_jsonl(tmp_path / "c.jsonl", [conversation("Who?", "ROMEO"), "", record])
    code = megagpt(["prep", "chat", "--input", str(source), "--tokenizer", str(shakespeare_dataset),
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"{source}:3:" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_characters_can_be_dropped(shakespeare_dataset, tmp_path, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", [conversation("caf\u00e9?", "Ay \u00e0 bient\u00f4t")])
    code = megagpt(["prep", "chat", "--input", str(source), "--tokenizer", str(shakespeare_dataset), "--out",
                    str(tmp_path / "out"), "--unknown-chars", "drop", "--val-fraction", "0"])
    assert code == 0 and "3 unknown characters dropped" in capsys.readouterr().out
    ids, _ = Conversations(Dataset(tmp_path / "out"), "train")[0]
    assert Dataset(tmp_path / "out").tokenizer.decode(ids.tolist()) == "caf?Ay  bientt"


def test_sft_stage_refuses_a_dataset_of_tokens(shakespeare_dataset, tmp_path):
    from megagpt.dataset import DataError

    with pytest.raises(DataError, match="the sft stage reads kind 'chat'"):
        train_run(tmp_path / "run", sft_overrides(shakespeare_dataset, max_steps=1))
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------- rows, attention and the loss


def test_rows_hold_one_conversation_each_with_targets_only_on_the_mask():
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 50, n), (rng.random(n) < 0.5).astype(np.uint8)) for n in (5, 9, 3)]
    x, y = to_rows(samples, block_size=32)
    assert x.shape == y.shape == (3, 8)
    for row, (ids, mask) in enumerate(samples):
        n = len(ids)
        for t in range(8):
            assert x[row, t] == (ids[t] if t < n - 1 else 0)
            assert y[row, t] == (ids[t + 1] if t < n - 1 and mask[t + 1] else -1)
    ids, mask = rng.integers(0, 50, 40), np.ones(40, dtype=np.uint8)  # longer than block_size + 1: cut there
    x, y = to_rows([(ids, mask)], block_size=32)
    assert x[0].tolist() == ids[:32].tolist() and y[0].tolist() == ids[1:33].tolist()


def test_no_token_attends_to_another_conversation(toy):
    """A row's logits equal those of its conversation alone, whatever the other rows and the padding hold."""
    torch.manual_seed(0)
    dataset = Dataset(toy)
    model = GPT(ModelConfig(**{**TINY_MODEL, "block_size": BLOCK}, vocab_size=dataset.vocab_size)).eval()
    loader = ChatLoader(dataset, BLOCK, 4, seed=3)
    indices = loader.order.window_ids(np.arange(4))
    x, _ = next(loader)
    with torch.no_grad():
        batch = model(x)[0]
        scrambled = x.clone()
        scrambled[1:] = torch.randint(0, dataset.vocab_size, scrambled[1:].shape)
        for row, i in enumerate(indices):
            ids, _ = loader.conversations[int(i)]
            alone = model(torch.from_numpy(ids[:-1].astype(np.int64))[None])[0][0]
            assert torch.allclose(batch[row, :len(ids) - 1], alone, atol=1e-5)
        n0 = len(loader.conversations[int(indices[0])][0]) - 1
        scrambled[0, n0:] = torch.randint(0, dataset.vocab_size, (x.shape[1] - n0,))  # its own padding too
        assert torch.allclose(model(scrambled)[0][0, :n0], batch[0, :n0], atol=1e-5)


def test_loss_on_masked_out_labels_changes_no_gradient():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL, vocab_size=40))
    x, labels = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    mask = torch.rand(3, 16) < 0.4
    altered = torch.where(mask, labels, torch.randint(0, 40, (3, 16)))  # other labels wherever the mask is 0

    def grads(loss_fn):
        model.zero_grad()
        loss_fn(model(x)[0]).backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads(lambda logits: masked_loss(logits, torch.where(mask, altered, -1)))
    def reference(labels_used):  # float64 cross-entropy, each position weighted by its mask bit
        return lambda logits: (F.cross_entropy(logits.double().reshape(-1, 40), labels_used.reshape(-1),
                                               reduction="none") * mask.reshape(-1)).sum() / mask.sum()

    for labels_used in (labels, altered):
        for a, b in zip(ours, grads(reference(labels_used)), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_the_chat_loader_resumes_inside_a_step_with_the_next_micro_batch(toy):
    dataset = Dataset(toy)

    def loader():
        return ChatLoader(dataset, BLOCK, 2, grad_accum_steps=3, seed=4)

    straight = loader()
    expected = [next(straight) for _ in range(9)][5:]
    first = loader()
    for _ in range(5):  # step 1's second micro-batch of 3
        next(first)
    state = first.state_dict()
    assert (state["samples_consumed"], state["micro_batches_into_step"]) == (6, 2)
    resumed = loader()
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------- training: eval, samples, resume, ranks


def test_val_loss_is_the_mean_over_assistant_tokens_and_samples_are_conversations(toy, source, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_dir, sft_overrides(toy, init_from=str(source), max_steps=3, eval_interval=3, eval_steps=10,
                                     sample_tokens=12))
    logged = [r for r in metrics(run_dir) if "val_loss" in r][-1]
    model, _, _ = load_for_inference(run_dir)
    conversations = Conversations(Dataset(toy), "val")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(conversations)):
            ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in conversations[i])
            logp = torch.log_softmax(model(ids[None, :-1])[0][0].double(), dim=-1)
            picked = logp[torch.arange(len(ids) - 1), ids[1:]]
            total, count = total - (picked * mask[1:]).sum().item(), count + int(mask[1:].sum())
    assert logged["val_assistant_tokens"] == count
    assert logged["val_loss"] == pytest.approx(total / count, rel=1e-5)
    text = (run_dir / "samples" / "step_000003.txt").read_text()
    assert text.startswith(("user: Who", "system: ")) and "\nassistant: " in text and "(reference) " in text


def test_sft_resume_is_exact_and_never_reads_init_from_again(toy, source, tmp_path):
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    train_run(straight, sft_overrides(toy, init_from=str(source), max_steps=8, checkpoint_interval=4))
    copy = tmp_path / "copy_of_source"
    shutil.copytree(source, copy)
    train_run(parted, sft_overrides(toy, init_from=str(copy), max_steps=4, checkpoint_interval=4))
    shutil.rmtree(copy)  # a resumed run that read init_from again would fail here
    summary = train_run(parted, sft_overrides(toy, init_from=str(copy), max_steps=8, checkpoint_interval=4))
    assert summary.resumed_from == "step_000004"
    assert losses(parted) == losses(straight) and sorted(losses(parted)) == list(range(1, 9))


@pytest.mark.distributed
def test_two_ranks_zero2_equal_one_rank(toy, source, tmp_path):
    """1 rank accumulating 2 micro-batches and 2 ranks with 1 each see the same conversations: same losses."""
    def overrides(zero):
        return tiny(toy, stage="sft", init_from=str(source), global_batch_tokens=4 * BLOCK * 2, zero_stage=zero,
                    model_block_size=BLOCK)

    train_run(tmp_path / "one", overrides(0))  # this process: one rank
    finish(torchrun(tmp_path / "two", overrides(2), 2))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == list(range(1, 9)) and len(set(one.values())) > 1
    assert two == pytest.approx(one, abs=1e-5)


# ---------------------------------------------------------------- the Shakespeare questions and `eval qa`


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    from data_prep.shakespeare_qa import prepare_shakespeare_qa

    return prepare_shakespeare_qa(tmp_path_factory.mktemp("qa") / "qa", max_length=65)[0]


def _speeches(text, start, end):
    """(speaker, lines) of each speech wholly inside text[start:end], parsed here as the play reads."""
    out, offset = [], 0
    for block in text.split("\n\n"):
        lo, hi = offset, offset + len(block)
        offset = hi + 2
        rows = block.strip("\n").split("\n")
        if start <= lo and hi <= end and len(rows) >= 2 and rows[0].endswith(":"):
            out.append((rows[0][:-1], rows[1:]))
    return out


def _check_answers(questions, speeches):
    """Each "who" answer is the speaker of its line, each "next" answer follows its (quoted) line, in speeches."""
    said = {(speaker, line) for speaker, lines in speeches for line in lines}
    before = {}  # next line -> the lines it follows in a speech
    for _, lines in speeches:
        for line, following in zip(lines[:-1], lines[1:], strict=True):
            before.setdefault(following, []).append(line)
    assert {q["kind"] for q in questions} == {"who", "next"}
    for q in questions:
        asked = q["messages"][0]["content"]
        assert q["messages"][1]["content"] == q["answer"]
        if q["kind"] == "who":
            assert (q["answer"], asked.removeprefix("Who says: ")) in said
        else:
            tail = asked.removeprefix("What follows: ").removeprefix("...")
            assert any(line.endswith(tail) for line in before.get(q["answer"], []))


def _lines(q):
    """The lines of the play a question quotes or answers."""
    asked = q["messages"][0]["content"].removeprefix("Who says: ").removeprefix("What follows: ")
    return {asked, q["answer"]} if q["kind"] == "next" else {asked}


def test_shakespeare_questions_hold_out_whole_speeches_from_every_play(qa, shakespeare_path, shakespeare_dataset):
    from megagpt.eval_qa import load_questions

    text = shakespeare_path.read_text()
    cut = int(len(text) * 0.9)
    pretrained = _speeches(text, 0, cut)  # the text both models pre-train on; the rest gives no question
    train, val = load_questions(qa, "train"), load_questions(qa, "val")
    _check_answers(train, pretrained)
    _check_answers(val, pretrained)
    assert not set().union(*map(_lines, val)) & set().union(*map(_lines, train))
    split_of = {q["messages"][0]["content"].removeprefix("Who says: "): split
                for split, questions in (("train", train), ("val", val)) for q in questions if q["kind"] == "who"}
    held_out = []  # per speech with a "who" question: is it a held-out one
    for _, lines in pretrained:
        splits = {split_of[line] for line in lines if line in split_of}
        assert len(splits) <= 1, f"a speech asked about in both splits: {lines}"
        held_out += [splits == {"val"}] if splits else []
    assert 0.07 < sum(held_out) / len(held_out) < 0.13
    tenths = [held_out[i * len(held_out) // 10:(i + 1) * len(held_out) // 10] for i in range(10)]
    assert all(any(part) for part in tenths), "every stretch of the text (every play) has held-out speeches"
    assert Dataset(qa).manifest.settings["holdout"] == "speeches"
    assert (qa / "tokenizer.json").read_bytes() == (shakespeare_dataset / "tokenizer.json").read_bytes()
    assert Dataset(qa).manifest.split("val").samples == len(val)
    # the question files are the dataset's sources and stay inside it: the manifest names them there, as they are
    named = [(Path(f["path"]), f["sha256"]) for f in Dataset(qa).manifest.sources["files"]]
    assert named == [(qa / "questions-train.jsonl", sha256_file(qa / "questions-train.jsonl")),
                     (qa / "questions-val.jsonl", sha256_file(qa / "questions-val.jsonl"))]


def test_shakespeare_questions_tail_holdout_asks_about_the_last_tenth(shakespeare_path):
    from data_prep.shakespeare_qa import questions

    text = shakespeare_path.read_text()
    cut = int(len(text) * 0.9)
    found = questions(text, 65, holdout="tail")
    _check_answers(found["train"], _speeches(text, 0, cut))
    _check_answers(found["val"], _speeches(text, cut, len(text)))
    assert not set().union(*map(_lines, found["val"])) & set().union(*map(_lines, found["train"]))


def test_shakespeare_questions_refuse_an_unknown_holdout(tmp_path):
    from data_prep.shakespeare_qa import prepare_shakespeare_qa
    from megagpt.errors import UserError

    with pytest.raises(UserError, match="--holdout middle"):
        prepare_shakespeare_qa(tmp_path / "qa", holdout="middle")
    assert not (tmp_path / "qa").exists()


def test_eval_qa_reports_what_the_models_answer(qa, source, tmp_path, capsys):
    from chat_helpers import chat_prompt, reference_reply

    from megagpt.eval_qa import load_questions, subset

    run_dir = tmp_path / "sft"
    train_run(run_dir, sft_overrides(qa, init_from=str(source), max_steps=30, lr=1e-2, checkpoint_interval=30))
    report = tmp_path / "report.json"
    code = megagpt(["eval", "qa", str(run_dir), "--data", str(qa), "--limit", "5", "--max-new-tokens", "10",
                    "--candidates", "4", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(report.read_text())
    model, tokenizer, _ = load_for_inference(run_dir)
    end = tokenizer.special_tokens[END]
    val = load_questions(qa, "val")
    asked = subset(val, "who", 5, 0) + subset(val, "next", 5, 0)
    replies = [reference_reply(model, chat_prompt(tokenizer, q["messages"][0]["content"]), end, 10) for q in asked]
    assert got["finetuned"]["stop_rate"] == pytest.approx(sum(stopped for _, stopped in replies) / 10)
    hits = [tokenizer.decode(r).strip() == q["answer"] for (r, _), q in zip(replies, asked, strict=True)]
    assert got["finetuned"]["speaker_accuracy"] == pytest.approx(sum(hits[:5]) / 5)
    train_who = [q["answer"] for q in load_questions(qa, "train") if q["kind"] == "who"]
    top4 = [speaker for speaker, _ in Counter(train_who).most_common(4)]
    assert got["ranking"] == {"candidates": 4,
                              "coverage": pytest.approx(sum(q["answer"] in top4 for q in asked[:5]) / 5)}
    # both rankings, row by row in float64: the fine-tuned model scores "NAME<|end|>" as its reply, the base
    # model the whole "\nNAME:\n<line>\n" as a speech
    ranked = [max(top4, key=lambda s: _logprob(model, chat_prompt(tokenizer, q["messages"][0]["content"]),
                                               [*tokenizer.encode(s), end])) for q in asked[:5]]
    assert got["finetuned"]["ranking_speaker_accuracy"] == pytest.approx(
        sum(r == q["answer"] for r, q in zip(ranked, asked, strict=False)) / 5)
    base, base_tok, _ = load_for_inference(source)
    lines = [q["messages"][0]["content"].removeprefix("Who says: ") for q in asked[:5]]
    ranked = [max(top4, key=lambda s: _logprob(base, [], base_tok.encode(f"\n{s}:\n{line}\n"))) for line in lines]
    assert got["base"]["path"] == str(source) and got["base"]["ranking_speaker_accuracy"] == pytest.approx(
        sum(r == q["answer"] for r, q in zip(ranked, asked, strict=False)) / 5)
    assert got["chance"]["uniform"] == pytest.approx(1 / len({q["answer"] for q in asked[:5]}))
    assert got["holdout"] == "speeches"
    assert 0 <= got["base"]["few_shot_speaker_accuracy"] <= 1 and got["base"]["few_shot_k"] in (0, 1, 2, 3)
    assert "speaker exact match" in capsys.readouterr().out


@pytest.mark.parametrize("damage, expected", [
    ("not json", "questions-val.jsonl:2: not JSON"),
    ('{"kind": "who"}', "questions-val.jsonl:2: not a question"),
    ("no who", "questions-val.jsonl has no speaker"),
])
def test_eval_qa_names_a_damaged_questions_file(qa, tmp_path, capsys, damage, expected):
    data = tmp_path / "qa"
    shutil.copytree(qa, data)
    val = data / "questions-val.jsonl"
    lines = val.read_text().splitlines()
    if damage == "no who":
        lines = [line for line in lines if json.loads(line)["kind"] != "who"]
    else:
        lines[1] = damage
    val.write_text("\n".join(lines) + "\n")
    # no run dir exists: the questions are read, and refused, before any model is loaded
    assert megagpt(["eval", "qa", str(tmp_path / "no_run"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _logprob(model, prefix, continuation):
    """log P(continuation | prefix) in float64, one row, cut to the model's last block_size + 1 tokens."""
    row = (prefix + continuation)[-(model.cfg.block_size + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([row[:-1]]))[0][0].double()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(row) - 1), torch.tensor(row[1:])]
    return float(logp[-min(len(continuation), len(row) - 1):].sum())


def test_a_data_loader_state_of_another_stage_is_refused():
    from megagpt.chat_data import STATE_VERSION, resume_position
    from megagpt.dataset import DataError

    chat = {"format_version": STATE_VERSION, "seed": 1, "samples_consumed": 8, "micro_batches_into_step": 0,
            "global_batch_samples": 4, "num_samples": 10, "world_size": 1}
    pairs = {**chat, "kind": "pairs"}
    assert resume_position(chat, None, 1, 10, 4, 1) == resume_position(pairs, "pairs", 1, 10, 4, 1) == (2, 0)
    pretraining = {"format_version": 2, "seed": 1, "windows_consumed": 8}
    for state, kind in ((chat, "pairs"), (pairs, None), (pretraining, None), (pretraining, "pairs")):
        with pytest.raises(DataError, match="is not this stage's"):
            resume_position(state, kind, 1, 10, 4, 1)
