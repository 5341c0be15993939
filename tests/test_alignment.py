"""Preference data, the reward model and DPO: masks, one-line prep errors, the Bradley-Terry and DPO losses against
float64 references, the score read at the end-of-turn, evaluation recomputed, a frozen reference, export/load."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from align_helpers import BLOCK, model_chain, preference_dataset, stage_overrides, train_steps
from chat_helpers import run_config, train_run, write_jsonl
from helpers import metrics, train_records

from data_prep.preferences import PreferenceSettings, encode_completion, prepare_preferences
from megagpt.align_objectives import bradley_terry_loss, dpo_loss, sequence_logprobs
from megagpt.chat_template import ASSISTANT, CHAT_TOKENS, END, USER
from megagpt.cli import main as megagpt
from megagpt.config import ModelConfig
from megagpt.dataset import Dataset, sha256_file
from megagpt.inference import load_for_inference
from megagpt.model import GPT
from megagpt.preference_data import Pairs, Prompts, pair_rows, score_rows
from megagpt.reward_model import RewardModel, read_scores
from megagpt.tokenizer import CharTokenizer, WithSpecialTokens


@pytest.fixture(scope="module")
def tok():
    base = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ?!.")))
    return WithSpecialTokens(base, {name: base.vocab_size + i for i, name in enumerate(CHAT_TOKENS)})


@pytest.fixture(scope="module")
def chain(shakespeare_dataset, tmp_path_factory):
    return model_chain(shakespeare_dataset, tmp_path_factory.mktemp("chain"))


# ---------------------------------------------------------------- preference data


def test_a_completions_mask_is_one_exactly_on_the_reply_and_its_end_even_after_earlier_assistant_turns(tok):
    prompt = [("user", "hi?"), ("assistant", "yo."), ("user", "who?")]
    got = encode_completion(tok, prompt, "me")
    s = tok.special_tokens
    ids = [s[USER], *tok.encode("hi?"), s[END], s[ASSISTANT], *tok.encode("yo."), s[END], s[USER],
           *tok.encode("who?"), s[END], s[ASSISTANT], *tok.encode("me"), s[END]]
    assert got.ids.tolist() == ids
    assert got.mask.tolist() == [0] * (len(ids) - 3) + [1, 1, 1]  # "m", "e", <|end|>: the earlier "yo." is context


def test_prep_preferences_writes_pairs_that_read_back_with_their_masks(chain, tmp_path):
    records = [{"prompt": "who?", "chosen": "ROMEO", "rejected": "xq"},
               {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                           {"role": "user", "content": "and?"}],
                "chosen": [{"role": "assistant", "content": "ok"}], "rejected": "no no"}]
    out = preference_dataset(tmp_path / "prefs", chain["sft"], records, val_fraction=0.0)
    dataset = Dataset(out)
    assert dataset.kind == "preferences" and dataset.manifest.splits["train"].samples == 2
    tokenizer = dataset.tokenizer
    pairs = Pairs(dataset, "train")
    for record, (chosen, rejected) in zip(records, (pairs[0], pairs[1]), strict=True):
        for (ids, mask), side in ((chosen, "chosen"), (rejected, "rejected")):
            reply = record[side] if isinstance(record[side], str) else record[side][0]["content"]
            picked = [int(i) for i, m in zip(ids, mask, strict=True) if m]
            assert picked == [*tokenizer.encode(reply), tokenizer.special_tokens[END]]
            assert ids[int(np.argmax(mask)) - 1] == tokenizer.special_tokens[ASSISTANT]
    prompts = Prompts(dataset, "train", BLOCK - 1)
    assert prompts[0] == pairs[0][0][0][:int(np.argmax(pairs[0][0][1]))].tolist()


def test_rows_put_chosen_first_and_read_the_score_at_each_end_of_turn(chain, tmp_path):
    pairs = Pairs(Dataset(chain["prefs"]), "train")
    batch = [pairs[0], pairs[1], pairs[2]]
    ids, last = score_rows(batch, BLOCK)
    x, y = pair_rows(batch, BLOCK)
    end = Dataset(chain["prefs"]).tokenizer.special_tokens[END]
    completions = [c for c, _ in batch] + [r for _, r in batch]
    for row, (cids, cmask) in enumerate(completions):
        assert last[row] == len(cids) - 1 and ids[row, last[row]] == end
        assert ids[row, :len(cids)].tolist() == cids.tolist()
        targets = [int(t) for t, m in zip(cids[1:], cmask[1:], strict=True) if m]
        assert [t for t in y[row].tolist() if t != -1] == targets


def test_pairs_longer_than_max_length_and_identical_replies_are_dropped_and_counted(chain, tmp_path):
    records = [{"prompt": "who?", "chosen": "ROMEO", "rejected": "xq"},
               {"prompt": "who?", "chosen": "same", "rejected": "same"},
               {"prompt": "who?", "chosen": "a" * 40, "rejected": "b"}]
    source = write_jsonl(tmp_path / "p.jsonl", records)
    _, summary = prepare_preferences([source], tmp_path / "out", chain["sft"],
                                     PreferenceSettings(val_fraction=0.0, max_length=20))
    assert summary.pairs == {"train": 1, "val": 0} and summary.identical == 1 and summary.too_long == 1


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"prompt": "hi", "chosen": "a"}), 'expected an object {"prompt"'),
    (json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}),
     "roles out of order"),
    (json.dumps({"prompt": "hi", "chosen": 3, "rejected": "b"}), '"chosen" must be the reply'),
    (json.dumps({"prompt": "hi", "chosen": "a", "rejected": "é"}), "not in the char tokenizer's vocabulary"),
])
def test_bad_pairs_are_one_line_errors_naming_file_and_line(chain, tmp_path, capsys, line, message):
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    source = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    code = megagpt(["prep", "preferences", "--input", str(source), "--tokenizer", str(chain["sft"]), "--out",
                    str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{source}:2:" in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage, command", [("sft", "megagpt prep chat "), ("reward", "megagpt prep preferences "),
                                            ("dpo", "megagpt prep preferences "), ("ppo", "megagpt prep preferences ")])
def test_a_missing_dataset_is_told_the_prep_command_of_the_kind_its_stage_reads(stage, command, tmp_path):
    from megagpt.config import ConfigError

    with pytest.raises(ConfigError, match=f"has no manifest.json; prepare it first with `{command}"):
        train_run(tmp_path / "run", stage_overrides(stage, tmp_path / "none", tmp_path / "sft"))


def test_the_reward_stage_refuses_a_chat_dataset(chain, tmp_path, capsys):
    from megagpt.dataset import DataError

    with pytest.raises(DataError, match="kind 'preferences'"):
        train_run(tmp_path / "run", stage_overrides("reward", chain["chats"], chain["sft"]))


def _with_another_tokenizer(run: Path, out: Path, chars=lambda chars: chars[::-1]) -> Path:
    """A copy of a run whose char tokenizer lists as many characters, `chars(its own)` (by default in reverse
    order): the same vocab_size and shape, other token ids."""
    shutil.copytree(run, out)
    folder = out / "tokenizer"
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["chars"] = chars(spec["chars"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = sha256_file(folder / "tokenizer.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("key", ["reference", "reward_model"])
def test_a_frozen_model_of_another_tokenizer_or_missing_is_refused_naming_its_key(chain, tmp_path, key):
    from megagpt.config import ConfigError

    stage, run = ("dpo", chain["sft"]) if key == "reference" else ("ppo", chain["reward"])
    other = _with_another_tokenizer(run, tmp_path / "other")
    extra = {} if key == "reference" else {"align_reward_model": str(chain["reward"])}
    for path, message in ((other, "uses another one"), (tmp_path / "gone", "no such directory")):
        overrides = stage_overrides(stage, chain["prefs"], chain["sft"], **{**extra, f"align_{key}": str(path)})
        with pytest.raises(ConfigError, match=f"^align.{key}.*{message}"):
            train_run(tmp_path / f"run_{path.name}", overrides)


# ---------------------------------------------------------------- the objectives against float64


def test_bradley_terry_loss_and_its_gradient_match_float64():
    torch.manual_seed(1)
    chosen, rejected = torch.randn(7, requires_grad=True), torch.randn(7, requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    loss.backward()
    d = (chosen - rejected).detach().double()
    sigma = 1 / (1 + torch.exp(-d))
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(-d)).mean().item(), rel=1e-6)
    assert chosen.grad.double().tolist() == pytest.approx((-(1 - sigma) / 7).tolist(), rel=1e-5)
    assert rejected.grad.double().tolist() == pytest.approx(((1 - sigma) / 7).tolist(), rel=1e-5)


def _logprob_sums(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Row by row in float64: Σ over targets != -1 of logit[target] - log Σ exp(logits)."""
    out = []
    for row_logits, row_targets in zip(logits.double().tolist(), targets.tolist(), strict=True):
        total = 0.0
        for position, target in zip(row_logits, row_targets, strict=True):
            if target != -1:
                total += position[target] - math.log(sum(math.exp(v) for v in position))
        out.append(total)
    return out


def test_dpo_loss_and_implicit_rewards_match_float64():
    torch.manual_seed(2)
    B, T, V, beta = 3, 5, 7, 0.3
    policy_logits = torch.randn(2 * B, T, V, requires_grad=True)
    reference_logits = torch.randn(2 * B, T, V)
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -1  # the prompt
    targets[1, 4] = -1  # padding
    policy = sequence_logprobs(policy_logits, targets)
    reference = sequence_logprobs(reference_logits, targets)
    loss, chosen, rejected = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta)
    lp, lr = _logprob_sums(policy_logits.detach(), targets), _logprob_sums(reference_logits, targets)
    ref_chosen = [beta * (lp[i] - lr[i]) for i in range(B)]
    ref_rejected = [beta * (lp[B + i] - lr[B + i]) for i in range(B)]
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(ref_chosen, ref_rejected, strict=True)) / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert chosen.tolist() == pytest.approx(ref_chosen, rel=1e-5)
    assert rejected.tolist() == pytest.approx(ref_rejected, rel=1e-5)
    assert not chosen.requires_grad and not rejected.requires_grad  # for logging: no graph kept alive
    loss.backward()
    assert policy_logits.grad[:, :2].abs().max() == 0 and policy_logits.grad[1, 4].abs().max() == 0


# ---------------------------------------------------------------- the reward model


def test_the_reward_model_is_the_backbone_with_a_head_read_at_the_last_token():
    torch.manual_seed(3)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=11)
    gpt = GPT(cfg)
    model = RewardModel(cfg)
    model.load_state_dict(gpt.state_dict())  # a plain GPT's weights: the backbone, the head stays at zero
    assert model.score.weight.abs().max() == 0 and model.score.bias.abs().max() == 0
    torch.nn.init.normal_(model.score.weight)
    torch.nn.init.normal_(model.score.bias)
    ids = torch.randint(0, 11, (3, 9))
    last = torch.tensor([8, 3, 5])
    hidden = {}
    gpt.transformer.ln_f.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    gpt(ids)
    expected = hidden["h"].double() @ model.score.weight.double()[0] + model.score.bias.double()
    got = read_scores(model(ids)[0], last)
    assert got.double().tolist() == pytest.approx(expected[torch.arange(3), last].tolist(), rel=1e-5, abs=1e-6)


def test_reward_stage_logs_accuracy_and_evaluates_on_held_out_pairs(chain, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_dir, stage_overrides("reward", chain["prefs"], chain["sft"], max_steps=2, eval_interval=2,
                                       eval_steps=50))
    assert all({"accuracy", "margin"} <= set(r) for r in train_records(run_dir))
    logged = [r for r in metrics(run_dir) if "val_accuracy" in r][-1]
    model, _, cfg = load_for_inference(run_dir)
    assert isinstance(model, RewardModel) and cfg.train.stage == "reward"
    val = Pairs(Dataset(chain["prefs"]), "val")
    margins = []
    with torch.no_grad():
        for chosen, rejected in (val[i] for i in range(len(val))):
            scores = [model(torch.from_numpy(ids.astype(np.int64))[None])[0][0, -1].double().item()
                      for ids, _ in (chosen, rejected)]
            margins.append(scores[0] - scores[1])
    assert logged["val_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert logged["val_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
    assert logged["val_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / len(margins),
                                               rel=1e-5)


def test_a_reward_model_exports_and_loads_with_the_same_scores(chain, tmp_path, capsys):
    assert megagpt(["export", str(chain["reward"]), "--out", str(tmp_path / "export")]) == 0
    from_run, _, _ = load_for_inference(chain["reward"])
    from_export, _, _ = load_for_inference(tmp_path / "export")
    ids = torch.randint(0, from_run.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(from_run(ids)[0], from_export(ids)[0])
    assert megagpt(["chat", str(tmp_path / "export"), "--prompt", "hi"]) == 2
    assert "does not generate" in capsys.readouterr().err
    assert megagpt(["export", str(chain["reward"]), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "is a reward model (a GPT with a scalar head), which GPT-2's language-model folder cannot hold; " \
           "export it with --format megagpt" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- DPO


def test_dpo_starts_at_log2_logs_margins_and_keeps_its_reference_bit_identical(chain, tmp_path):
    cfg = run_config(stage_overrides("dpo", chain["prefs"], chain["sft"], lr=3e-3, align_beta=0.5))
    run = train_steps(cfg, tmp_path / "run", 3)
    sft, _, _ = load_for_inference(chain["sft"])
    for name, p in run.stage.reference.named_parameters():
        assert torch.equal(p, sft.state_dict()[name]) and not p.requires_grad, name
    policy = dict(run.engine.module.named_parameters())
    assert not torch.equal(policy["transformer.wte.weight"], sft.transformer.wte.weight)

    run_dir = tmp_path / "logged"
    train_run(run_dir, stage_overrides("dpo", chain["prefs"], chain["sft"], max_steps=2, lr=3e-3, align_beta=0.5))
    first, second = train_records(run_dir)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: every margin is 0
    assert first["margin"] == 0 and first["accuracy"] == 0
    assert second["margin"] == pytest.approx(second["chosen_reward"] - second["rejected_reward"])


# ---------------------------------------------------------------- the demo: the real-word rule, its pairs, eval prefs


def test_the_real_word_rule_and_its_edge_cases():
    from megagpt.realwords import real_word_rate, vocabulary, words

    known = vocabulary("O'er the hill, ROMEO said: 'Tis well-a-day! 3 times.")
    assert known == {"o'er", "the", "hill", "romeo", "said", "tis", "well", "a", "day", "times"}
    assert words("Romeo's  wherefore--art thou?") == ["romeo's", "wherefore", "art", "thou"]
    assert real_word_rate("romeo THE zqx", known) == pytest.approx(2 / 3)
    assert real_word_rate("", known) == 0.0 and real_word_rate("?! ... 42", known) == 0.0  # no words: 0
    assert real_word_rate("Hill-hill", known) == 1.0


def _qa_dir(path, questions):
    """A dir shaped like `megagpt prep shakespeare-qa`'s question files, with a few free-text questions."""
    path.mkdir()
    for split, lines in (("train", questions), ("val", questions[:3])):
        records = [{"messages": [{"role": "user", "content": f"What follows: {q}"},
                                 {"role": "assistant", "content": "x"}], "kind": "next", "answer": "x"} for q in lines]
        write_jsonl(path / f"questions-{split}.jsonl", records)
    return path


def test_a_question_without_a_pair_is_dropped_for_a_named_reason():
    from megagpt.shakespeare_prefs import MARGIN, SAME, label

    known = {"good", "lord"}
    assert label(["good lord", "xq zz", "good zz"], known, 0.5) == ("good lord", "xq zz", 1.0, 0.0)
    assert label(["good lord", "good zz"], known, 0.6) == MARGIN  # 1.0 against 0.5
    assert label(["good", "good"], known, 0.01) == MARGIN  # one text: no gap
    assert label(["good", "good"], known, 0.0) == SAME


def test_shakespeare_prefs_refuses_to_replace_a_folder_that_is_no_dataset_before_sampling(tmp_path, capsys):
    # before, --force was checked only after the model had sampled every question, by the dataset's writer
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    qa = _qa_dir(tmp_path / "qa", ["My lord, I will"])
    assert megagpt(["prep", "shakespeare-prefs", "--sft", str(tmp_path / "no-model"), "--qa", str(qa), "--out",
                    str(out), "--force"]) == 2
    assert "is not a dataset dir" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("case", ["base model", "no questions", "questions its tokenizer cannot write"])
def test_shakespeare_prefs_names_the_option_at_fault(case, chain, tmp_path, capsys):
    sft, qa = chain["sft"], _qa_dir(tmp_path / "qa", ["My lord, I will", "What say you"])
    if case == "base model":
        sft, expected = chain["base"], f"--sft {chain['base']}: not a fine-tuned model"
    elif case == "no questions":
        qa, expected = tmp_path / "none", f"--qa {tmp_path / 'none'}: no questions-train.jsonl"
    else:
        sft = _with_another_tokenizer(sft, tmp_path / "no_w", lambda chars: [c.replace("W", "~") for c in chars])
        expected = f"--sft {sft}: a question of --qa does not fit its tokenizer"
    assert megagpt(["prep", "shakespeare-prefs", "--sft", str(sft), "--qa", str(qa), "--out", str(tmp_path / "out"),
                    "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_shakespeare_prefs_labels_by_the_rule_and_eval_prefs_reports_it(chain, tmp_path, capsys, monkeypatch):
    import data_prep.sample_dataset
    from data_prep.shakespeare_qa import TRAIN_FRACTION, play_text
    from megagpt.realwords import real_word_rate, vocabulary

    put_in_place, placed = data_prep.sample_dataset.replace_out_dir, []

    def seen_then_put_in_place(work, out):
        placed.append(sorted(p.name for p in work.iterdir()))
        put_in_place(work, out)

    monkeypatch.setattr(data_prep.sample_dataset, "replace_out_dir", seen_then_put_in_place)

    lines = ["My lord, I will", "Good morrow to", "What say you", "The king is", "And so I", "Come hither,",
             "I pray thee", "Now, by my", "Farewell, good", "O gentle", "Be it so", "Who is it"]
    qa = _qa_dir(tmp_path / "qa", lines)
    out = tmp_path / "prefs"
    assert megagpt(["prep", "shakespeare-prefs", "--sft", str(chain["sft"]), "--qa", str(qa), "--out", str(out),
                    "--samples", "4", "--min-margin", "0.01", "--val-fraction", "0.2", "--max-new-tokens", "16"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("megagpt prep shakespeare-prefs:")]
    text = play_text()
    known = vocabulary(text[:int(len(text) * TRAIN_FRACTION)])
    assert set((out / "words.txt").read_text().split("\n")[:-1]) == known
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 2 and len(pairs) == sum(s.samples for s in Dataset(out).manifest.splits.values())
    for pair in pairs:
        good, bad = real_word_rate(pair["chosen"], known), real_word_rate(pair["rejected"], known)
        assert pair["scores"] == [good, bad] and good >= bad + 0.01
    assert len((out / "prompts-val.jsonl").read_text().splitlines()) == 3
    # every file was inside the dataset dir before it took its name (a kill leaves all of it or none)
    assert {"pairs.jsonl", "words.txt", "prompts-val.jsonl", "manifest.json"} <= set(*placed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefs", "qa"]  # no work dir left beside it
    counted = re.fullmatch(r"megagpt prep shakespeare-prefs: (\d+) questions -> (\d+) pairs \(.*\), \d+ tokens; "
                           r"dropped: (\d+) below --min-margin, (\d+) with no room .*, (\d+) with identical replies; "
                           r"mean real-word rate .*", line)
    assert counted and line.count(" pairs") == 1, line
    questions, written, *dropped = map(int, counted.groups())
    assert questions == len(lines) == written + sum(dropped) and written == len(pairs)

    report_path = tmp_path / "eval.json"
    assert megagpt(["eval", "prefs", str(chain["sft"]), "--reward-model", str(chain["reward"]), "--reference",
                    str(chain["sft"]), "--data", str(out), "--out", str(report_path), "--max-new-tokens", "16"]) == 0
    report = json.loads(report_path.read_text())
    (row,) = report["runs"]
    samples = report["samples"]
    assert len(samples) == 3 and all({"run", "prompt", "reply"} <= set(s) for s in samples)
    assert row["real_word_rate"] == pytest.approx(sum(real_word_rate(s["reply"], known) for s in samples) / 3)
    assert row["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # the SFT model against itself
    assert "real words" in capsys.readouterr().out


def _prompts_dir(folder: Path, prompt: str) -> Path:
    """The two files of a `prep shakespeare-prefs` dir that `eval prefs` reads, with one held-out prompt."""
    folder.mkdir()
    (folder / "words.txt").write_text("hi\n")
    write_jsonl(folder / "prompts-val.jsonl", [{"messages": [{"role": "user", "content": prompt}]}])
    return folder


@pytest.mark.parametrize("option", ["--reward-model", "--reference"])
def test_eval_prefs_refuses_a_judge_of_another_tokenizer_before_sampling(option, chain, tmp_path, capsys):
    run = chain["reward"] if option == "--reward-model" else chain["sft"]
    other = _with_another_tokenizer(run, tmp_path / "other")
    assert megagpt(["eval", "prefs", str(chain["sft"]), option, str(other), "--data",
                    str(_prompts_dir(tmp_path / "data", "hi")), "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option} {other}: its tokenizer" in err, err
    assert not (tmp_path / "e.json").exists()


def test_eval_qa_names_the_model_whose_tokenizer_cannot_write_a_question(chain, tmp_path, capsys):
    no_w = _with_another_tokenizer(chain["sft"], tmp_path / "no_w", lambda chars: [c.replace("W", "~") for c in chars])
    qa = _qa_dir(tmp_path / "qa", ["My lord"])
    for split in ("train", "val"):
        who = {"messages": [{"role": "user", "content": "Who says: My lord"}, {"role": "assistant", "content": "X"}],
               "kind": "who", "answer": "X"}
        with open(qa / f"questions-{split}.jsonl", "a") as f:
            f.write(json.dumps(who) + "\n")
    assert megagpt(["eval", "qa", str(no_w), "--data", str(qa), "--limit", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{no_w}: a question of --data" in err and "'W'" in err, err


def test_eval_prefs_names_the_run_whose_tokenizer_cannot_write_a_prompt(chain, tmp_path, capsys):
    no_h = _with_another_tokenizer(chain["sft"], tmp_path / "no_h", lambda chars: [c.replace("h", "~") for c in chars])
    assert megagpt(["eval", "prefs", str(no_h), "--data", str(_prompts_dir(tmp_path / "data", "hi")), "--out",
                    str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{no_h}: a held-out prompt" in err and "'h'" in err, err


@pytest.mark.parametrize("which", ["run", "--reward-model", "--reference"])
def test_eval_prefs_names_a_missing_model_dir_before_anything_else(which, tmp_path, capsys):
    # no data dir either: the mistyped model dir is what the user is told about
    missing, present = str(tmp_path / "nope"), str(tmp_path)
    argv = {"run": [missing], "--reward-model": [present, "--reward-model", missing],
            "--reference": [present, "--reference", missing]}[which]
    assert megagpt(["eval", "prefs", *argv, "--out", str(tmp_path / "e.json")]) == 2
    label = "RUN_DIR" if which == "run" else which
    assert capsys.readouterr().err == f"megagpt eval prefs: error: {label} {missing}: no such directory\n"



def test_bf16_reward_scores_keep_fp32_precision_at_a_large_common_offset():
    """A bf16 reward model's head is computed in fp32: at a common offset of 100 (Bradley-Terry cannot see it)
    bf16 outputs step by 0.5, and the margins the loss and GAE read would drown; float64 reference."""
    torch.manual_seed(0)
    model = RewardModel(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=40, dropout=0.0))
    torch.nn.init.normal_(model.score.weight, std=0.1)
    torch.nn.init.constant_(model.score.bias, 100.0)
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, 40, (4, 16))
    with torch.no_grad():
        scores = model(ids)[0]
        hidden = model.transformer.ln_f(model.transformer.h[0](model.transformer.wte(ids) + model.transformer.wpe(
            torch.arange(16))))
    want = hidden.double() @ model.score.weight.double().T + model.score.bias.double()
    assert scores.dtype == torch.float32 and (scores.double() - want.squeeze(-1)).abs().max() < 1e-4
