"""train.init_from: the first step starts from the loaded weights (run dir at any ZeRO stage, @STEP, export dir,
Hugging Face GPT-2 folder), new vocabulary rows, the one GPT-2 weight mapping, and every bad source."""

import json

import pytest
import torch
import torch.nn.functional as F
from chat_helpers import BLOCK, chat_dataset, pretrain_overrides, run_config, sft_overrides, train_run
from helpers import CPU_CONFIG, TINY_MODEL, losses

from megagpt.chat_data import ChatLoader
from megagpt.cli import main as megagpt
from megagpt.config import ConfigError, ModelConfig
from megagpt.data import TrainLoader
from megagpt.dataset import Dataset
from megagpt.export import export, hf_state_dict
from megagpt.hf_gpt2 import megagpt_state_dict
from megagpt.inference import consolidated_state_dict, load_for_inference
from megagpt.init_from import InitSource, load_into
from megagpt.model import GPT


@pytest.fixture(scope="module")
def sources(shakespeare_dataset, tmp_path_factory):
    """Tiny pre-trained runs: ZeRO 0 with checkpoints at steps 2 and 4, ZeRO 3 (parameters partitioned)."""
    root = tmp_path_factory.mktemp("init_from")
    trained = {"lr": 1e-2, "warmup_steps": 0}  # a few steps that move the model well away from its init
    train_run(root / "zero0", pretrain_overrides(shakespeare_dataset, checkpoint_interval=2, **trained))
    train_run(root / "zero3", pretrain_overrides(shakespeare_dataset, zero_stage=3, **trained))
    export(root / "zero0", root / "export")
    return root


def first_batch_loss(model_dir, dataset, step=None) -> float:
    """The source model's loss on the batch a new run's first step sees (TrainLoader position 0)."""
    model, _, _ = load_for_inference(model_dir, step)
    x, y = next(TrainLoader(Dataset(dataset), BLOCK, 8, seed=1337))
    with torch.no_grad():
        return model(x, y)[1].item()


@pytest.mark.parametrize("spec, model_dir, step", [("zero0", "zero0", None), ("zero0@2", "zero0", 2),
                                                   ("zero3", "zero3", None), ("export", "export", None)])
def test_first_step_loss_is_the_source_models_loss_on_that_batch(spec, model_dir, step, sources,
                                                                 shakespeare_dataset, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_dir, pretrain_overrides(shakespeare_dataset, init_from=str(sources / spec), max_steps=1,
                                          checkpoint_interval=1))
    expected = first_batch_loss(sources / model_dir, shakespeare_dataset, step)
    assert losses(run_dir)[1] == pytest.approx(expected, rel=1e-6)
    assert losses(run_dir)[1] < 4.0  # a trained model, not a random one (ln 65 = 4.17)


def test_the_first_update_starts_from_the_loaded_weights_under_zero2(sources, shakespeare_dataset, tmp_path):
    """Megatron-LM once built the optimizer before loading: its fp32 master copy held the random init and the
    model reverted after one step. Here one Adam step moves each weight by at most lr from the source's."""
    lr, run_dir = 1e-3, tmp_path / "run"
    train_run(run_dir, pretrain_overrides(shakespeare_dataset, init_from=str(sources / "zero0"), zero_stage=2,
                                          max_steps=1, checkpoint_interval=1, lr=lr, min_lr=0.0, warmup_steps=0,
                                          weight_decay=0.0))
    before = consolidated_state_dict(sources / "zero0", "step_000004")
    after = consolidated_state_dict(run_dir, "step_000001")
    moves = torch.cat([(after[name] - before[name]).abs().flatten() for name in before])
    assert moves.max().item() <= lr * 1.001
    assert moves.median().item() > 0.5 * lr  # Adam's first step: lr * sign(gradient) almost everywhere


def test_new_vocabulary_rows_start_at_the_mean_and_old_rows_are_unchanged(sources):
    state = consolidated_state_dict(sources / "zero0", "step_000004")
    old = state["transformer.wte.weight"]
    cfg = ModelConfig(**{**TINY_MODEL, "block_size": BLOCK}, vocab_size=old.shape[0] + 4)
    source = InitSource(sources / "zero0", "run", {}, "step_000004")
    model = load_into(GPT(cfg), source)
    wte = model.transformer.wte.weight.detach()
    assert torch.equal(wte[:old.shape[0]], old)
    assert torch.allclose(wte[old.shape[0]:], old.double().mean(dim=0).float().expand(4, -1), atol=1e-7)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head grew with it
    for name, tensor in state.items():
        if "wte" not in name and name != "lm_head.weight":
            assert torch.equal(model.state_dict()[name], tensor), name


# ---------------------------------------------------------------- a Hugging Face GPT-2 folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, shakespeare_path):
    """A random GPT2LMHeadModel and a byte-level BPE trained here on Tiny Shakespeare: nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(shakespeare_path.read_text()[:200_000].splitlines(), trainer)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_first_sft_step_from_a_hugging_face_gpt2_folder_is_that_models_loss(hf_folder, tmp_path):
    from transformers import GPT2LMHeadModel

    data = chat_dataset(tmp_path / "chat", hf_folder)
    run_dir = tmp_path / "run"
    # model.bias=true: the CPU config sets bias false, and a shape key must agree with the source (GPT-2: true)
    train_run(run_dir, sft_overrides(data, init_from=str(hf_folder), max_steps=1, checkpoint_interval=1,
                                     model_bias=True))
    x, y = next(ChatLoader(Dataset(data), BLOCK, 8, seed=1337))
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    old = hf.get_input_embeddings().weight.detach().clone()
    hf.resize_token_embeddings(old.shape[0] + 4, mean_resizing=False)  # the 4 chat tokens: rows at the mean
    with torch.no_grad():
        hf.get_input_embeddings().weight.copy_(torch.cat([old, old.mean(dim=0, keepdim=True).expand(4, -1)]))
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
        logits = hf(x).logits.double()
        expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1).item()
    assert losses(run_dir)[1] == pytest.approx(expected, rel=1e-5)
    assert json.loads((run_dir / "tokenizer" / "manifest.json").read_text())["tokenizer"]["kind"] == "huggingface"


def test_a_config_without_model_keys_takes_the_whole_shape_from_the_source(hf_folder, tmp_path):
    from megagpt.config import config_from_dict
    from megagpt.init_from import resolve

    data = Dataset(chat_dataset(tmp_path / "chat", hf_folder))
    cfg = config_from_dict({"data": {"dataset_dir": str(data.dir)},
                            "train": {"stage": "sft", "init_from": str(hf_folder)}})
    resolved, source = resolve(cfg, data, tmp_path / "run")
    m = resolved.model
    assert source.kind == "hf" and json.loads((hf_folder / "config.json").read_text())["n_positions"] == BLOCK
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) == (2, 2, 32, BLOCK, True)
    assert m.vocab_size == data.vocab_size == source.shape["vocab_size"] + 4


def test_the_gpt2_mapping_goes_both_ways(hf_folder):
    from safetensors.torch import load_file

    hf_state = load_file(str(hf_folder / "model.safetensors"))
    ours = megagpt_state_dict(hf_state)
    cfg = run_config([*(f"model.{k}={v}" for k, v in TINY_MODEL.items()), f"model.block_size={BLOCK}",
                      "model.bias=true", f"model.vocab_size={ours['transformer.wte.weight'].shape[0]}"])
    back = hf_state_dict({k: v for k, v in ours.items() if k != "lm_head.weight"}, cfg)
    assert set(back) == {k for k in hf_state if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert all(torch.equal(back[k], hf_state[k]) for k in back)
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # (out, in) as nn.Linear keeps it


# ---------------------------------------------------------------- bad sources and conflicts


def test_a_conflicting_shape_key_is_a_one_line_error_naming_both_values(sources, shakespeare_dataset, tmp_path,
                                                                         capsys):
    overrides = pretrain_overrides(shakespeare_dataset, init_from=str(sources / "zero0"), model_n_layer=3)
    code = megagpt(["train", str(CPU_CONFIG), *[a for o in overrides for a in ("--set", o)], "--run-dir",
                    str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "model.n_layer=3 conflicts with train.init_from=" in err and "(n_layer=2)" in err


def bad_sources(root, hf_folder):
    plain = root / "plain"
    plain.mkdir(exist_ok=True)
    llama = root / "llama"
    llama.mkdir(exist_ok=True)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (llama / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    return {"missing": (root / "nowhere", "no such directory"),
            "not a model": (plain, "neither a megagpt run dir"),
            "step of an export": (f"{root / 'export'}@2", "picks a checkpoint of a run dir"),
            "missing step": (f"{root / 'zero0'}@3", "no checkpoint of that step; available steps: 2, 4"),
            "not gpt2": (llama, "model_type 'llama', expected 'gpt2'")}


@pytest.mark.parametrize("case", ["missing", "not a model", "step of an export", "missing step", "not gpt2"])
def test_a_bad_source_is_a_clear_error(case, sources, hf_folder, shakespeare_dataset, tmp_path):
    spec, message = bad_sources(sources, hf_folder)[case]
    with pytest.raises(ValueError, match=message):
        train_run(tmp_path / "run", pretrain_overrides(shakespeare_dataset, init_from=str(spec)))
    assert not (tmp_path / "run").exists()


def test_a_run_dir_whose_config_was_edited_after_training_is_refused(sources, tmp_path):
    """As sample and export refuse it: n_head read from the edited config.yaml loaded the same tensors into
    another function (4 heads of 8 instead of 2 of 16), silently."""
    import shutil

    from megagpt.init_from import open_source

    run = tmp_path / "edited"
    shutil.copytree(sources / "zero0", run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("n_head: 2", "n_head: 4"))
    with pytest.raises(ConfigError, match=f"train.init_from={run}: .*model.n_head is 4 but checkpoint "
                                          f"step_000004 was trained with 2"):
        open_source(str(run))


def test_data_from_another_tokenizer_is_refused(sources, tmp_path):
    from data_prep.prep import PrepSettings, prepare

    (tmp_path / "corpus.txt").write_text("Who is the prince? HAMLET. Who loves Juliet? ROMEO. Who is mad? LEAR.\n")
    other = prepare([tmp_path / "corpus.txt"], tmp_path / "other", PrepSettings(val_fraction=0.1))
    data = chat_dataset(tmp_path / "chat", other, unknown_chars="drop")
    with pytest.raises(ConfigError, match="uses another one"):
        train_run(tmp_path / "run", sft_overrides(data, init_from=str(sources / "zero0")))


def test_checkpoint_weights_equal_the_source_before_any_step(sources):
    """load_into gives the source's weights exactly (fp32), every name, the tied head included."""
    state = consolidated_state_dict(sources / "zero3", "step_000004")
    vocab = state["transformer.wte.weight"].shape[0]
    model = load_into(GPT(ModelConfig(**{**TINY_MODEL, "block_size": BLOCK}, vocab_size=vocab)),
                      InitSource(sources / "zero3", "run", {}, "step_000004"))
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], v.detach()) for k, v in state.items())


def test_a_folder_named_with_an_at_step_is_that_folder_and_only_otherwise_a_step(tmp_path):
    from megagpt.init_from import parse_spec

    # before, a folder literally named x@2 was read as run x at step 2
    (tmp_path / "x@2").mkdir()
    assert parse_spec(f"{tmp_path}/x@2") == (tmp_path / "x@2", None)
    assert parse_spec(f"{tmp_path}/y@2") == (tmp_path / "y", 2)
    assert parse_spec(f"{tmp_path}/a@b@30") == (tmp_path / "a@b", 30)  # the last @ only
    with pytest.raises(ConfigError, match=r"@abc is not a step number"):
        parse_spec(f"{tmp_path}/y@abc")


# ---------------------------------------------------------------- a GPT-2 folder in shards


@pytest.fixture(scope="module")
def sharded_gpt2(tmp_path_factory):
    """A random tiny GPT2LMHeadModel saved in 2+ safetensors shards with their index, and a one-word tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("sharded") / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, activation_function="gelu",
                        bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(folder, max_shard_size="8KB", safe_serialization=True)
    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(folder / "tokenizer.json"))
    return folder, hf.double()


def as_bin_shards(folder, out):
    """The same model as pytorch_model-*.bin shards and pytorch_model.bin.index.json (what older
    transformers versions wrote; 5.x writes safetensors only)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("model*"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    renamed = {shard: shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
               for shard in set(index["weight_map"].values())}
    for shard, name in renamed.items():
        torch.save(load_file(folder / shard), out / name)
    index["weight_map"] = {tensor: renamed[shard] for tensor, shard in index["weight_map"].items()}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_gpt2_folder_in_shards_computes_the_logits_transformers_computes(kind, sharded_gpt2, tmp_path):
    # before, a folder of shards and an index was "neither a megagpt run dir ... nor a Hugging Face GPT-2 folder"
    from megagpt.init_from import open_source

    folder, hf = sharded_gpt2
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 2
    folder = folder if kind == "safetensors" else as_bin_shards(folder, tmp_path / "bin")
    model, _, _ = load_for_inference(folder)
    assert open_source(str(folder)).kind == "hf"
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.double()(x)[0]
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("damage", ["shard missing", "tensor missing"])
def test_a_shard_or_tensor_the_index_names_but_the_folder_lacks_is_one_line_naming_it(damage, sharded_gpt2, tmp_path,
                                                                                       capsys):
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(sharded_gpt2[0], folder)
    index = folder / "model.safetensors.index.json"
    record = json.loads(index.read_text())
    shard = sorted(set(record["weight_map"].values()))[1]
    if damage == "shard missing":
        (folder / shard).unlink()
        expected = f"{index}: its shard {shard} is missing"
    else:
        record["weight_map"]["transformer.h.9.ln_1.weight"] = shard
        index.write_text(json.dumps(record))
        expected = f"{index}: puts transformer.h.9.ln_1.weight in {shard}, which does not hold it"
    assert megagpt(["sample", str(folder), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
