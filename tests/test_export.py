"""Export: a 2-rank ZeRO-3 run -> safetensors that reproduce the engine; HF GPT-2 gives the same logits."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from dist_helpers import metrics
from safetensors.torch import load_file

from megagpt.cli import main as megagpt
from megagpt.config import load_config
from megagpt.data import eval_batches
from megagpt.dataset import load_tokenizer
from megagpt.doctor_checks import child_env
from megagpt.errors import UserError
from megagpt.export import export, hf_state_dict
from megagpt.inference import load_for_inference
from megagpt.model import GPT
from megagpt.sample import sample_texts

EVAL_STEPS = 2


@pytest.fixture(scope="module")
def zero3_run(zero3_two_ranks):
    """2 ranks, ZeRO 3 (parameters sharded), an evaluation of the trained engine at the last step: conftest's run,
    which test_distributed checks against one process."""
    assert load_config(zero3_two_ranks.dir / "config.yaml").train.eval_steps == EVAL_STEPS
    return zero3_two_ranks.dir


def val_loss(model, cfg, dataset, world_size=2):
    """The trainer's evaluation, redone on one process: every rank's batches, averaged like the all-reduce."""
    per_rank = []
    with torch.no_grad():
        for rank in range(world_size):
            batches = eval_batches(dataset, "val", cfg.model.block_size, cfg.train.micro_batch_size,
                                   EVAL_STEPS, rank, world_size)
            per_rank.append(torch.stack([model(x, y)[1] for x, y in batches]).mean())
    return torch.stack(per_rank).mean().item()


def test_export_reproduces_the_trained_engine(zero3_run, shakespeare_dataset, tmp_path):
    out = export(zero3_run, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer"}
    model, _, cfg = load_for_inference(out)
    engine_val_loss = [r["val_loss"] for r in metrics(zero3_run) if "val_loss" in r][-1]
    assert val_loss(model, cfg, shakespeare_dataset) == pytest.approx(engine_val_loss, abs=1e-5)


def test_tied_weights_are_stored_once(zero3_run, tmp_path):
    from safetensors import safe_open

    out = export(zero3_run, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_sampling_an_export_equals_sampling_the_run(zero3_run, tmp_path):
    out = export(zero3_run, tmp_path / "export")
    assert sample_texts(out, "ROMEO:", 40, seed=7) == sample_texts(zero3_run, "ROMEO:", 40, seed=7)


def test_bf16_export_is_bf16_and_close(zero3_run, tmp_path):
    out = export(zero3_run, tmp_path / "export", dtype="bf16")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    full, _, _ = load_for_inference(zero3_run)
    half, _, _ = load_for_inference(out)
    idx = torch.randint(0, full.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(half(idx)[0], full(idx)[0], atol=0.05, rtol=0.05)


def _hf_logits(folder, idx):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return hf(idx).logits


def test_hf_export_gives_gpt2lmheadmodel_the_same_logits(zero3_run, tmp_path):
    pytest.importorskip("transformers")
    out = export(zero3_run, tmp_path / "hf", fmt="hf")
    ours, _, _ = load_for_inference(zero3_run)
    idx = torch.randint(0, ours.cfg.vocab_size, (3, ours.cfg.block_size))
    with torch.no_grad():
        want = ours(idx)[0]
    torch.testing.assert_close(_hf_logits(out, idx), want, atol=1e-5, rtol=0)


def test_hf_config_token_ids_exist_in_the_vocabulary_and_transformers_loads_it_quietly(zero3_run, tmp_path, capfd):
    pytest.importorskip("transformers")
    out = export(zero3_run, tmp_path / "hf", fmt="hf")
    config = json.loads((out / "config.json").read_text())
    eos = load_tokenizer(zero3_run / "tokenizer").eos_id  # None: Tiny Shakespeare is one document
    assert config["bos_token_id"] == config["eos_token_id"] == eos
    assert all(config[key] is None or 0 <= config[key] < config["vocab_size"] for key in ("bos_token_id",
                                                                                         "eos_token_id"))
    capfd.readouterr()
    _hf_logits(out, torch.zeros(1, 1, dtype=torch.long))
    err = capfd.readouterr().err
    assert "bos_token_id" not in err and "eos_token_id" not in err, err


def test_the_export_command_prints_its_one_line_on_stdout_and_no_deepspeed_notice(zero3_run, tmp_path):
    """A fresh process without DS_ACCELERATOR (the test session sets it): DeepSpeed, imported to merge the ZeRO
    shards, once warned on stdout that it guessed the accelerator."""
    env = {k: v for k, v in child_env().items() if k != "DS_ACCELERATOR" or torch.cuda.is_available()}
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "megagpt", "export", str(zero3_run), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"megagpt export: wrote {out}\n"


def test_an_export_removes_what_a_killed_export_left_and_nothing_else(zero3_run, tmp_path, capsys):
    import socket

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process holds now
    host = socket.gethostname()
    killed = tmp_path / f".export.partial-{host}-{gone.pid}-abcd1234"
    running = tmp_path / f".export.partial-{host}-{os.getpid()}-efgh5678"  # an export still at work
    elsewhere = tmp_path / f".export.partial-another-host-{gone.pid}-ijkl9012"  # another node's: not judged here
    for folder in (killed, running, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    export(zero3_run, tmp_path / "export")
    assert not killed.exists() and running.is_dir() and elsewhere.is_dir()
    assert f"removed {killed}, left by an export that was killed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", running.name, elsewhere.name])


@pytest.mark.parametrize("fmt", ["megagpt", "hf"])
def test_exported_files_follow_the_umask(zero3_run, tmp_path, fmt):
    old = os.umask(0o022)
    try:
        out = export(zero3_run, tmp_path / fmt, fmt=fmt)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["model.safetensors"] == 0o644
    assert all(mode == (0o755 if (out / name).is_dir() else 0o644) for name, mode in modes.items()), modes


def test_megagpt_sample_of_an_hf_export_equals_sampling_the_run(zero3_run, tmp_path, capsys):
    out = export(zero3_run, tmp_path / "hf", fmt="hf")
    capsys.readouterr()
    texts = []
    for path in (zero3_run, out):
        assert megagpt(["sample", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "7",
                        "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) > 40


def test_a_gpt2_folder_samples_with_its_own_tokenizer_json(zero3_run, tmp_path):
    """Any GPT-2 folder (config.json, model.safetensors, tokenizer.json) samples; the text is its tokenizer's."""
    tokenizers = pytest.importorskip("tokenizers")
    out = export(zero3_run, tmp_path / "hf", fmt="hf")
    chars = load_tokenizer(zero3_run / "tokenizer").chars
    vocab = {c: i for i, c in enumerate(chars)}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=chars[0]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")  # one token per character
    hf.decoder = tokenizers.decoders.Fuse()
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((out / name).read_bytes())
    hf.save(str(folder / "tokenizer.json"))
    assert sample_texts(folder, "ROMEO:", 20, seed=3) == sample_texts(zero3_run, "ROMEO:", 20, seed=3)


def test_hf_layout_with_biases(tmp_path):
    """bias=True keeps its biases; GELU, eps and the Conv1D transposes hold for fresh random weights."""
    pytest.importorskip("transformers")
    import json

    from safetensors.torch import save_file

    from megagpt.export import hf_config

    cfg = load_config(None, ["model.n_layer=3", "model.n_head=2", "model.n_embd=24", "model.block_size=17",
                             "model.vocab_size=71", "model.bias=true"])
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their 0/1 initialisation
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(hf_state_dict(state, cfg), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, "fp32")))
    idx = torch.randint(0, 71, (2, 17))
    with torch.no_grad():
        want = model(idx)[0]
    torch.testing.assert_close(_hf_logits(tmp_path, idx), want, atol=1e-5, rtol=0)


def _tiny_folder(folder, kind):
    """An export dir or a GPT-2 folder of a tiny random model, without a tokenizer (nothing gets that far)."""
    from safetensors.torch import save_file

    from megagpt.config import save_config
    from megagpt.export import hf_config

    cfg = load_config(None, ["model.n_layer=1", "model.n_head=2", "model.n_embd=8", "model.block_size=8",
                             "model.vocab_size=11", "model.bias=true"])
    state = {k: v for k, v in GPT(cfg.model).state_dict().items() if k != "lm_head.weight"}
    folder.mkdir()
    if kind == "export":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        save_config(cfg, folder / "config.yaml")
        (folder / "export.json").write_text(json.dumps({"format": "megagpt", "checkpoint": "step_000001"}))
    else:
        save_file(hf_state_dict(state, cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hf_config(cfg, "fp32")))
    return folder


@pytest.mark.parametrize("kind, damage", [("export", "truncated"), ("export", "lfs pointer"), ("gpt2", "truncated"),
                                         ("gpt2", "lfs pointer"), ("gpt2", "bin")])
def test_an_unreadable_weights_file_is_one_line_naming_it(kind, damage, tmp_path, capsys):
    """A weights file copied in part, or a git-lfs pointer left by a clone without git-lfs: sample, chat and
    train.init_from read it through one loader, which names the file (not a safetensors/pickle traceback)."""
    from megagpt.init_from import open_source

    folder = _tiny_folder(tmp_path / kind, kind)
    weights = folder / "model.safetensors"
    if damage == "bin":  # an older GPT-2 folder's pickle, half of it
        state = load_file(weights)
        weights.unlink()
        weights = folder / "pytorch_model.bin"
        torch.save(state, weights)
    data = weights.read_bytes()
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize %d\n" % len(data)
    weights.write_bytes(pointer if damage == "lfs pointer" else data[:len(data) // 2])
    capsys.readouterr()
    assert megagpt(["sample", str(folder), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(weights) in err, err
    assert ("git lfs pull" in err) == (damage == "lfs pointer"), err
    with pytest.raises(UserError, match=re.escape(str(weights))):
        open_source(str(folder)).state_dict()


def test_a_gpt2_folder_of_something_else_is_one_line_naming_the_file(tmp_path):
    """config.json that is JSON but not an object, weights without GPT-2's token embedding: AttributeError and
    KeyError tracebacks before."""
    from safetensors.torch import save_file

    folder = _tiny_folder(tmp_path / "gpt2", "gpt2")
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if "wte" not in k}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{folder / 'model.safetensors'}: no wte.weight")):
        load_for_inference(folder)
    (folder / "config.json").write_text("[1]")
    with pytest.raises(UserError, match=re.escape(f"{folder / 'config.json'}: a JSON list, expected an object")):
        load_for_inference(folder)


def test_a_bf16_zero_0_run_exports_its_fp32_master_weights(shakespeare_dataset, tmp_path):
    """ZeRO 0 in bf16 keeps fp32 masters in DeepSpeed's unnamed fp32_groups and bf16 copies in the module: the
    export takes the masters by name (the tied head too), as zero_to_fp32 does for ZeRO 1-3; it took the copies."""
    from align_helpers import train_steps
    from helpers import CPU_CONFIG, tiny_overrides

    cfg = load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, dtype="bf16", max_steps=3))
    run = train_steps(cfg, tmp_path / "run", 3)
    run.save()
    names = dict(run.engine.module.named_parameters())
    masters = {name: master for group, fp32 in zip(run.engine.optimizer.fp16_groups,
                                                   run.engine.optimizer.fp32_groups, strict=True)
               for name, master in zip((n for p in group for n, q in names.items() if q is p), fp32, strict=True)}
    assert any(not torch.equal(m, names[n].float()) for n, m in masters.items())  # the copies are rounded
    weights = load_file(export(tmp_path / "run", tmp_path / "export") / "model.safetensors")
    assert set(weights) >= set(masters)
    assert all(torch.equal(weights[name], master) for name, master in masters.items())
    model, _, _ = load_for_inference(tmp_path / "export")
    assert torch.equal(model.lm_head.weight, masters["transformer.wte.weight"])
