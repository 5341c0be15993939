"""µP: standard unchanged bit for bit, µP's init and LR table, m = 1, every attention path, coordinate check."""

import math

import pytest
import torch
import torch.nn.functional as F

from megagpt.config import ModelConfig, load_config
from megagpt.engine import param_groups
from megagpt.generate import generate
from megagpt.hardware import cpuinfo
from megagpt.model import GPT, KVCache, _math_attention, attention_backend
from megagpt.mup import coord_check

# A tiny model trained 6 AdamW steps on fixed random batches, then 8 greedy tokens through the KV cache, recorded
# with the code of commit bcde61e, before µP existed (torch 2.13.0+cpu on an Intel CPU, 1 thread; loss as
# float.hex). `standard` must reproduce it bit for bit: same init draws, same forward, same optimizer groups.
# Bit for bit only on the recording's torch and CPU vendor: the CPU kernels round per instruction set (an AMD
# EPYC lands 1 float32 ulp off in the last steps).
BEFORE_MUP_MACHINE = ("2.13.0+cpu", "GenuineIntel")
BEFORE_MUP = {  # case: (model keys, losses, greedy tokens)
    "math_bias_dropout": (
        dict(attention="math", bias=True, dropout=0.1),
        ["0x1.0b45c00000000p+2", "0x1.0d81b20000000p+2", "0x1.0bd4840000000p+2", "0x1.0afba00000000p+2",
         "0x1.0b25d80000000p+2", "0x1.0b86ae0000000p+2"],
        [6, 15, 36, 42, 9, 40, 40, 40, 40, 40, 40, 40, 40]),
    "sdpa_checkpointing": (
        dict(attention="sdpa", bias=False, activation_checkpointing=True),
        ["0x1.0c8a1a0000000p+2", "0x1.0b4c5e0000000p+2", "0x1.0c80ec0000000p+2", "0x1.0b43a40000000p+2",
         "0x1.0a721a0000000p+2", "0x1.0bae400000000p+2"],
        [6, 15, 36, 42, 9, 9, 9, 9, 9, 9, 9, 9, 9]),
}


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), "" where there is none."""
    lines = cpuinfo().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


def model_cfg(**values) -> ModelConfig:
    base = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 50, "dropout": 0.0,
            "bias": True, "attention": "math"}
    return ModelConfig.model_validate({**base, **values})


def built(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def group_of(model: GPT, groups: list[dict]) -> dict[str, dict]:
    """parameter name -> the optimizer group holding it"""
    where = {id(p): g for g in groups for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# standard: unchanged
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BEFORE_MUP)
def test_standard_reproduces_the_model_from_before_mup(case):
    extra, want_losses, want_tokens = BEFORE_MUP[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: the summation order of the CPU kernels depends on it
    try:
        got, tokens = train_six_steps(extra)
    finally:
        torch.set_num_threads(threads)
    want = [float.fromhex(h) for h in want_losses]
    if (torch.__version__, cpu_vendor()) == BEFORE_MUP_MACHINE:
        assert got == want
    else:  # another torch or CPU may round differently: then the same numbers up to rounding
        assert got == pytest.approx(want, rel=1e-5)
    assert tokens == want_tokens


def train_six_steps(extra: dict) -> tuple[list[float], list[int]]:
    torch.manual_seed(1337)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, **extra)
    assert cfg.parametrization == "standard"  # the default
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, cfg), lr=1e-3, betas=(0.9, 0.99))
    batches = torch.Generator().manual_seed(0)
    got = []
    for _ in range(6):
        idx = torch.randint(0, 65, (4, 33), generator=batches)
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        got.append(loss.item())
    return got, generate(model, idx[:1, :5], 8, temperature=0)[0].tolist()


def test_standard_ignores_every_mup_key():
    plain = built(model_cfg())
    odd = built(model_cfg(mup_base_width=7, mup_input_alpha=3.0, mup_output_alpha=0.25))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), odd.state_dict().values(),
                                                 strict=True))
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(plain(idx)[0], odd(idx)[0])
    groups = param_groups(odd, 0.1, odd.cfg)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0)]  # as before µP


# ---------------------------------------------------------------------------------------------------------------
# µP's table
# ---------------------------------------------------------------------------------------------------------------
def mup_table(name: str, width: int, base: int, n_layer: int, sigma: float):
    """(init std, LR multiplier, weight decay) of each parameter, written out from Dey et al. 2024, Table 1."""
    m = width / base
    if name.endswith(("wte.weight", "wpe.weight")):
        return sigma, 1.0, 0.1  # embeddings (wte is also the tied output head): σ, η
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return 0.0, 1.0, 0.0  # gains are ones: std 0; η, no decay
    if name.endswith(".bias"):
        return 0.0, 1.0, 0.0  # zeros; η, no decay
    if name.endswith("c_proj.weight"):
        return sigma / math.sqrt(2 * n_layer * m), 1.0 / m, 0.1  # hidden, GPT-2's depth scaling kept
    assert name.endswith(("c_attn.weight", "c_fc.weight")), name
    return sigma / math.sqrt(m), 1.0 / m, 0.1  # hidden: σ²/m, η/m


@pytest.mark.parametrize("width", [64, 128])
def test_mup_init_std_and_lr_follow_the_table(width):
    base, sigma, n_layer = 32, 0.03, 2
    cfg = model_cfg(n_embd=width, n_head=4, parametrization="mup", mup_base_width=base, init_std=sigma)
    model = built(cfg, seed=width)
    groups = group_of(model, param_groups(model, 0.1, cfg))
    for name, p in model.named_parameters():
        std, lr_scale, decay = mup_table(name, width, base, n_layer, sigma)
        assert groups[name]["lr_scale"] == pytest.approx(lr_scale, rel=1e-12), name
        assert groups[name]["weight_decay"] == decay, name
        sample_std = p.detach().double().std().item()
        assert sample_std == pytest.approx(std, rel=0.1, abs=1e-12), name  # >= 2048 draws: 3% sampling error


def test_mup_updates_each_weight_by_its_groups_lr():
    """Adam's first step moves every entry by lr × lr_scale (the gradient's sign): the LR really is per group."""
    width, base, lr = 64, 16, 1e-3
    cfg = model_cfg(n_embd=width, parametrization="mup", mup_base_width=base)
    model = built(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0, cfg), lr=lr, eps=1e-12)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]  # as the training loop does
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    idx = torch.randint(0, 50, (4, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()
        moved = moved[p.grad.abs() > 1e-7]  # entries the batch reached (e.g. not unseen embedding rows)
        _, lr_scale, _ = mup_table(name, width, base, 2, 0.02)
        assert moved.numel() and torch.allclose(moved, torch.full_like(moved, lr * lr_scale), rtol=1e-3), name


# ---------------------------------------------------------------------------------------------------------------
# m = 1: standard but for the attention scale (and the multipliers when they are not 1)
# ---------------------------------------------------------------------------------------------------------------
def with_score_scale(model: GPT, scale: float) -> GPT:
    for block in model.transformer.h:
        block.attn.attend = lambda q, k, v, p, s=scale: _math_attention(q, k, v, p, scale=s)
    return model


def test_mup_at_width_multiplier_one_is_standard_but_for_the_attention_scale():
    std_cfg = model_cfg()
    mup_cfg = model_cfg(parametrization="mup", mup_base_width=32)  # m = 1
    standard, mup = built(std_cfg), built(mup_cfg)
    assert all(torch.equal(a, b) for a, b in zip(standard.state_dict().values(), mup.state_dict().values(),
                                                 strict=True))
    idx = torch.randint(0, 50, (2, 16))
    assert not torch.equal(standard(idx)[0], mup(idx)[0])  # 1/d_head instead of 1/√d_head
    with_score_scale(standard, 1.0 / std_cfg.head_dim)
    assert torch.equal(standard(idx)[0], mup(idx)[0])
    # one AdamW step each, through their own param groups (2 vs 3 groups, every lr_scale 1): same weights
    for model, cfg in ((standard, std_cfg), (mup, mup_cfg)):
        optimizer = torch.optim.AdamW(param_groups(model, 0.1, cfg), lr=1e-2)
        model(idx, idx)[1].backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(standard.state_dict().values(), mup.state_dict().values(),
                                                 strict=True))


def test_mup_multipliers_scale_the_input_and_the_logits():
    idx = torch.randint(0, 50, (2, 16))
    one = built(model_cfg(parametrization="mup", mup_base_width=32))
    out2 = built(model_cfg(parametrization="mup", mup_base_width=32, mup_output_alpha=2.0))
    torch.testing.assert_close(out2(idx)[0], 2 * one(idx)[0], rtol=0, atol=0)  # α_out/m with m = 1
    wide = built(model_cfg(parametrization="mup", mup_base_width=8))  # m = 4: logits / 4
    assert wide.output_multiplier == 0.25
    in3 = built(model_cfg(parametrization="mup", mup_base_width=32, mup_input_alpha=3.0))
    seen = []
    in3.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    in3(idx)
    tok_pos = in3.transformer.wte(idx) + in3.transformer.wpe(torch.arange(16))
    torch.testing.assert_close(seen[0], 3.0 * tok_pos)


# ---------------------------------------------------------------------------------------------------------------
# every attention path uses 1/d_head
# ---------------------------------------------------------------------------------------------------------------
def reference_attention(q, k, v, scale):
    q, k, v = (t.double() for t in (q, k, v))
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("attention", ["math", "sdpa", "triton"])
def test_every_attention_backend_scales_scores_by_one_over_head_dim(attention):
    cfg = model_cfg(n_embd=64, n_head=2, parametrization="mup", attention=attention)  # d_head 32
    q, k, v = torch.randn(3, 1, 2, 16, 32).unbind(0)
    got = attention_backend(cfg)(q, k, v, 0.0)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, 1 / 32), rtol=1e-5, atol=1e-5)


def test_kv_cache_path_uses_the_mup_scale():
    model = built(model_cfg(n_embd=64, parametrization="mup", mup_base_width=16)).eval()
    idx = torch.randint(0, 50, (1, 12))
    full, _ = model(idx)
    cache = KVCache(2)
    first, _ = model(idx[:, :7], cache=cache)
    rest = torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 12)], dim=1)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)
    greedy = generate(model, idx[:, :4], 6, temperature=0)
    assert torch.equal(greedy, generate(model, idx[:, :4], 6, temperature=0, use_cache=False))


def test_activation_checkpointing_gives_the_same_gradients_under_mup():
    grads = []
    for checkpointing in (False, True):
        model = built(model_cfg(n_embd=64, parametrization="mup", mup_base_width=16, mup_input_alpha=2.0,
                                activation_checkpointing=checkpointing)).train()
        idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
        model(idx, idx)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# the coordinate check
# ---------------------------------------------------------------------------------------------------------------
def test_coord_check_is_flat_under_mup_and_grows_under_standard(shakespeare_dataset):
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.block_size=32",
                             "model.mup_base_width=32", f"data.dataset_dir={shakespeare_dataset}",
                             "train.micro_batch_size=4"])
    result = coord_check(cfg, [16, 32, 64, 128], steps=4, seeds=1, lr=1e-2)  # head size 8: 2 to 16 heads
    mup, standard = result["slopes"]["mup"], result["slopes"]["standard"]
    assert set(mup) == {"embedding", "attn_logits", "attn_output", "mlp_output", "residual", "logits"}
    assert all(abs(s) < 0.4 for s in mup.values()), mup
    for layer in ("attn_logits", "mlp_output", "residual", "logits"):  # Adam's updates grow with width
        assert standard[layer] > 0.6, (layer, standard)
    assert abs(standard["embedding"]) < 0.2  # the embeddings' output does not depend on the width


def test_each_width_of_the_coord_check_keeps_the_head_size():
    from megagpt.mup import width_config

    base = model_cfg(n_embd=32, n_head=2)  # head size 16
    for width in (16, 64):
        cfg = width_config(base, width, 16, "mup")
        assert (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.parametrization) == (width, width // 16, 16, "mup")


def test_coord_check_reads_its_batches_as_it_trains_the_same_at_every_width(shakespeare_dataset, monkeypatch):
    # before, every seed's --steps batches were made up front (a list): a large --steps ran out of memory before
    # step 1. Now each run gets an iterator that reads a batch as it trains, the same windows at every width.
    import megagpt.mup as mup

    class Trained(Exception):
        pass

    runs = []  # per run: its width, what it was given, and the first 2 batches read from it

    def first_two(model_cfg, cfg, batches, lr, seed):
        runs.append((model_cfg.n_embd, batches, [next(batches) for _ in range(2)]))
        raise Trained  # stands in for the rest of the training

    monkeypatch.setattr(mup, "_train_and_record", first_two)
    cfg = load_config(None, [f"data.dataset_dir={shakespeare_dataset}", "train.micro_batch_size=4",
                             "model.n_layer=1", "model.n_head=1", "model.n_embd=16"])
    for widths in ([16, 32], [32, 16]):  # the first run of each call: width 16, then width 32
        with pytest.raises(Trained):
            mup.coord_check(cfg, widths, steps=50, seeds=1)
    assert [width for width, _, _ in runs] == [16, 32]
    assert not any(isinstance(batches, list) for _, batches, _ in runs)  # nothing of --steps' size made up front
    (_, _, first), (_, _, again) = runs
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(first, again, strict=True)
               for a, b in zip(pair_a, pair_b, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# export: the HF GPT-2 layout computes the µP model's logits
# ---------------------------------------------------------------------------------------------------------------
def hf_logits(folder, idx):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return hf(idx).logits


def test_hf_export_folds_every_mup_multiplier(tmp_path):
    pytest.importorskip("transformers")
    import json

    from safetensors.torch import save_file

    from megagpt.config import Config
    from megagpt.export import hf_config, hf_state_dict
    from megagpt.mup import fold_multipliers

    cfg = Config(model=model_cfg(n_layer=3, n_head=3, n_embd=48, vocab_size=71, parametrization="mup",
                                 mup_base_width=12, mup_input_alpha=1.7, mup_output_alpha=5.0))  # m = 4, d = 16
    model = built(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # biases, gains and q/k away from their initialisation
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(hf_state_dict(fold_multipliers(state, cfg.model), cfg), str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, "fp32")))
    idx = torch.randint(0, 71, (2, 16))
    with torch.no_grad():
        want = model(idx)[0]
    torch.testing.assert_close(hf_logits(tmp_path, idx), want, atol=1e-5, rtol=1e-5)
    unfolded = {k: v for k, v in hf_state_dict(state, cfg).items()}  # without the folding: another function
    save_file(unfolded, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert not torch.allclose(hf_logits(tmp_path, idx), want, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the trainer under µP: ZeRO-2 on 2 ranks = 1 rank, exact resume, elastic resume keeps the per-group LR
# ---------------------------------------------------------------------------------------------------------------
MUP_RUN = {"model_parametrization": "mup", "model_mup_base_width": 16, "model_mup_output_alpha": 2.0}  # m = 2


def mup_overrides(dataset, max_steps, zero_stage=2):
    from dist_helpers import tiny

    # 8 sequences of 32 tokens per step: accumulation 2 on one rank, 1 on two
    return tiny(dataset, zero_stage=zero_stage, global_batch_tokens=4 * 32 * 2, max_steps=max_steps,
                checkpoint_interval=4, keep_checkpoints=10, **MUP_RUN)


def saved_groups(run_dir, tag):
    """The torch AdamW param groups rank 0 saved in a tag: lr, lr_scale, weight_decay per group (ZeRO 1/2 and
    ZeRO 3 nest them under different keys)."""
    path = sorted((run_dir / "checkpoints" / tag).glob("*optim_states.pt"))[0]
    zero = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return (zero.get("base_optimizer_state") or zero["optimizer_state_dict"])["param_groups"]


def assert_mup_groups(run_dir, tag, step):
    from dist_helpers import metrics

    lr = next(r["lr"] for r in metrics(run_dir) if r.get("step") == step and "lr" in r)
    groups = saved_groups(run_dir, tag)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(0.5, 0.1), (1.0, 0.1), (1.0, 0.0)]
    assert [g["lr"] for g in groups] == pytest.approx([lr / 2, lr, lr], rel=1e-12)  # hidden: lr/m


@pytest.fixture(scope="module")
def one_rank_mup(shakespeare_dataset, tmp_path_factory):
    from dist_helpers import finish, single

    run_dir = tmp_path_factory.mktemp("mup") / "one_rank"
    finish(single(run_dir, mup_overrides(shakespeare_dataset, 8)))
    return run_dir


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_on_two_ranks_equals_one_rank_under_mup(one_rank_mup, shakespeare_dataset, tmp_path):
    from dist_helpers import finish, losses, single, torchrun

    finish(torchrun(tmp_path / "two", mup_overrides(shakespeare_dataset, 8), 2))
    one, two = losses(one_rank_mup), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 9))
    assert [two[s] for s in two] == pytest.approx([one[s] for s in two], rel=1e-5)  # summation order only
    assert_mup_groups(one_rank_mup, "step_000008", 8)
    assert_mup_groups(tmp_path / "two", "step_000008", 8)

    # elastic: the 2-rank step-4 checkpoint goes on one rank (a universal checkpoint) with its group LRs intact
    start = tmp_path / "two" / "checkpoints" / "step_000004"
    finish(single(tmp_path / "elastic", mup_overrides(shakespeare_dataset, 8), "--resume", str(start)))
    elastic = losses(tmp_path / "elastic")
    assert sorted(elastic) == [5, 6, 7, 8]
    assert [elastic[s] for s in elastic] == pytest.approx([one[s] for s in elastic], rel=1e-5)
    assert_mup_groups(tmp_path / "elastic", "step_000008", 8)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_elastic_resume_keeps_the_per_group_lr(shakespeare_dataset, tmp_path):
    """DeepSpeed's ZeRO-3 universal loader gives every group group 0's hyperparameters; megagpt.universal puts each
    group's own back, lr_scale included: the hidden matrices keep lr/m after going from 2 ranks to 1."""
    from dist_helpers import finish, losses, single, torchrun

    finish(torchrun(tmp_path / "two", mup_overrides(shakespeare_dataset, 8, zero_stage=3), 2))
    start = tmp_path / "two" / "checkpoints" / "step_000004"
    finish(single(tmp_path / "elastic", mup_overrides(shakespeare_dataset, 8, zero_stage=3), "--resume",
                  str(start)))
    two, elastic = losses(tmp_path / "two"), losses(tmp_path / "elastic")
    assert sorted(elastic) == [5, 6, 7, 8]
    assert [elastic[s] for s in elastic] == pytest.approx([two[s] for s in elastic], rel=1e-5)
    assert_mup_groups(tmp_path / "elastic", "step_000008", 8)


@pytest.mark.distributed
def test_resume_under_mup_continues_bit_identically(one_rank_mup, shakespeare_dataset, tmp_path):
    from dist_helpers import finish, losses, single

    start = one_rank_mup / "checkpoints" / "step_000004"
    finish(single(tmp_path / "resumed", mup_overrides(shakespeare_dataset, 8), "--resume", str(start)))
    want = losses(one_rank_mup)
    assert losses(tmp_path / "resumed") == {step: want[step] for step in range(5, 9)}


@pytest.mark.distributed
def test_mup_run_samples_and_exports(one_rank_mup, tmp_path):
    from megagpt.export import export
    from megagpt.inference import load_for_inference
    from megagpt.sample import sample_texts

    ours, _, cfg = load_for_inference(one_rank_mup)
    assert cfg.model.parametrization == "mup" and ours.output_multiplier == 1.0  # α_out 2 / m 2
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size))
    with torch.no_grad():
        want = ours(idx)[0]
    exported, _, _ = load_for_inference(export(one_rank_mup, tmp_path / "export"))
    assert torch.equal(exported(idx)[0], want)
    assert sample_texts(tmp_path / "export", "ROMEO:", 20, seed=3) == sample_texts(one_rank_mup, "ROMEO:", 20, seed=3)
    if __import__("importlib").util.find_spec("transformers"):
        torch.testing.assert_close(hf_logits(export(one_rank_mup, tmp_path / "hf", fmt="hf"), idx), want,
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the µP family: each size's shape and schedule, mup_base.yaml's hyperparameters
# ---------------------------------------------------------------------------------------------------------------
MUP_KEYS = {"model": ("parametrization", "mup_base_width", "init_std", "mup_input_alpha", "mup_output_alpha"),
            "train": ("lr", "min_lr")}


@pytest.mark.parametrize("size", ["gpt3_125m", "gpt3_350m", "gpt3_1.3b", "gpt3_13b", "shakespeare_char"])
def test_mup_family_takes_its_shape_from_the_size_and_its_hyperparameters_from_mup_base(size):
    import yaml
    from helpers import CONFIGS

    tuned = yaml.safe_load((CONFIGS / "mup_base.yaml").read_text())
    mup, standard = load_config(CONFIGS / f"mup_{size}.yaml").to_dict(), load_config(CONFIGS / f"{size}.yaml").to_dict()
    assert mup["name"] == f"mup_{size}" and mup["model"]["parametrization"] == "mup"
    for section in ("model", "data", "train", "deepspeed", "logging"):
        for key, value in mup[section].items():
            if key in MUP_KEYS.get(section, ()):
                assert value == tuned[section][key], f"{section}.{key}"
            else:
                assert value == standard[section][key], f"{section}.{key}"


def test_init_from_a_mup_run_carries_its_parametrization_and_resume_refuses_another(shakespeare_dataset, tmp_path):
    """The same weights compute another function under other µP keys: they come with the source, and a resume
    that would change them is refused."""
    from helpers import CPU_CONFIG, tiny_overrides

    from megagpt.config import ConfigError, load_config
    from megagpt.dataset import Dataset
    from megagpt.init_from import resolve
    from megagpt.train import train

    source = tmp_path / "source"
    mup = ["model.parametrization=mup", "model.mup_base_width=16", "model.mup_output_alpha=2.0"]
    tiny = tiny_overrides(shakespeare_dataset, max_steps=2, sample_tokens=0, eval_interval=100)
    train(load_config(CPU_CONFIG, [*tiny, *mup]), source)
    cfg = load_config(CPU_CONFIG, [*tiny, f"train.init_from={source}"])
    resolved, _ = resolve(cfg, Dataset(shakespeare_dataset), tmp_path / "new")
    m = resolved.model
    assert (m.parametrization, m.mup_base_width, m.mup_output_alpha) == ("mup", 16, 2.0)
    with pytest.raises(ConfigError, match="model.parametrization='standard' but checkpoint step_000002"):
        train(load_config(CPU_CONFIG, [*tiny, "train.max_steps=3"]), source)


def test_coord_check_prepares_a_missing_known_dataset_as_train_does(tmp_path, capsys):
    from helpers import CPU_CONFIG

    from megagpt.cli import main as cli_main
    from megagpt.errors import UserError
    from megagpt.mup import coord_check_main

    missing = tmp_path / "data" / "shakespeare_char"  # the default's name, as `megagpt train` prepares it
    argv = [str(CPU_CONFIG), "--widths", "16,32", "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "cc"),
            "--set", f"data.dataset_dir={missing}", "--set", "model.n_layer=1", "--set", "model.n_head=2",
            "--set", "model.n_embd=16", "--set", "model.block_size=16", "--set", "train.micro_batch_size=2"]
    with pytest.raises(UserError, match="has no manifest.json; prepare it first"):
        coord_check_main(argv)  # no hook: says how to prepare it
    assert cli_main(["mup", "coord-check", *argv]) == 0  # the command passes the hook
    assert "preparing Tiny Shakespeare" in capsys.readouterr().err
    assert (missing / "manifest.json").is_file() and (tmp_path / "cc" / "coord_check.json").is_file()


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0"], "--lr 0.0: must be a number above 0"), (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"), (["--lr", "1e300"], r"--lr 1e\+300"),
    (["--head-dim", "0"], "--head-dim 0: must be at least 1"),
    (["--out", "FILE/sub"], "is inside"),
])
def test_coord_check_refuses_bad_numbers_and_an_out_in_a_file_before_training(flags, named, tmp_path):
    from helpers import CPU_CONFIG

    from megagpt.errors import UserError
    from megagpt.mup import coord_check_main

    (tmp_path / "FILE").write_text("mine")
    argv = [str(CPU_CONFIG), "--widths", "16,32", "--out", str(tmp_path / "cc"),
            *[f.replace("FILE", str(tmp_path / "FILE")) for f in flags]]
    with pytest.raises(UserError, match=named):
        coord_check_main(argv)


def test_coord_check_names_a_width_that_does_not_fit_in_memory(shakespeare_dataset, tmp_path):
    from megagpt.errors import UserError

    cfg = load_config(None, ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
                             f"data.dataset_dir={shakespeare_dataset}", "train.micro_batch_size=2"])
    with pytest.raises(UserError, match=f"width {2**40} does not fit in memory"):
        coord_check(cfg, [16, 2**40], steps=1, seeds=1)
