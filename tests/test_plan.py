"""`megagpt plan`: params, FLOPs, ZeRO memory vs DeepSpeed's estimators; activations vs autograd"""

import json
import re
from pathlib import Path

import pytest
import torch

from megagpt import hardware
from megagpt import plan as planner
from megagpt import plan_memory as pm
from megagpt.config import ModelConfig, load_config
from megagpt.errors import UserError
from megagpt.model import GPT

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=256)


@pytest.mark.parametrize("bias", [False, True])
def test_meta_device_count_matches_real_model_and_closed_form(bias):
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=48, block_size=40, vocab_size=101, bias=bias)
    real = GPT(cfg)
    params = pm.count_params(cfg)
    assert params.total == sum(p.numel() for p in real.parameters()) == pm.closed_form_params(cfg)
    assert params.non_embedding == params.total - (101 + 40) * 48
    assert pm.flops_per_token(cfg, params) == real.flops_per_token()


# ---- model states vs DeepSpeed's own estimators (cpu_offload=False: everything on the GPU) ----
def _all_live_gpu_gib(estimator, model, nodes: int, options: str, gpus_per_node: int = 8) -> float:
    """Run a DeepSpeed `..._all_live` estimator (it prints a table) and read its per-GPU GiB for `options`."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimator(model, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    row = re.search(rf"\|\s*([0-9.]+)GB \| {re.escape(options)}\s*$", out.getvalue(), re.MULTILINE)
    return float(row.group(1))


def _zero3_term_deepspeed_leaves_out(total_params: int, gpus: int) -> float:
    """DeepSpeed's ZeRO-3 formula counts 18 bytes per partitioned parameter but stage3.py holds 20:
    the 16-bit weight partition 2, its persistent 16-bit gradient partition (grad_partitions_flat_buffer) 2,
    the fp32 master 4, Adam m and v 8, and the fp32 gradient it builds per sub-group for the step 4.
    The planner counts all 20; like with like means leaving out one 2-byte partition."""
    return 2 * total_params / gpus


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_match_deepspeed_all_live_estimators_on_a_real_model(stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    cfg = load_config(ROOT / "configs/gpt3_125m.yaml", ["model.n_layer=4"]).model  # built for real: 4 layers
    model = GPT(cfg)
    if stage == 2:
        reference = _all_live_gpu_gib(estimate_zero2_model_states_mem_needs_all_live, model, 1,
                                      "offload_optimizer=none")
    else:
        reference = _all_live_gpu_gib(estimate_zero3_model_states_mem_needs_all_live, model, 1,
                                      "offload_param=none, offload_optimizer=none, zero_init=1")
    params = pm.count_params(cfg)
    ours = pm.model_state_bytes(params, stage, 8)
    if stage == 3:
        ours -= _zero3_term_deepspeed_leaves_out(params.total, 8)
    ours /= 2**30
    assert ours == pytest.approx(reference, rel=0.05)


@pytest.mark.parametrize("size,nodes", [("1.3b", 1), ("13b", 4), ("175b", 96)])
@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_match_deepspeed_estimators_for_big_models(size, nodes, stage):
    # Too big to build: DeepSpeed's lower-level estimators, fed the meta-device count.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = pm.count_params(load_config(ROOT / f"configs/gpt3_{size}.yaml").model)
    ours = pm.model_state_bytes(params, stage, 8 * nodes)
    if stage == 3:
        ours -= _zero3_term_deepspeed_leaves_out(params.total, 8 * nodes)
        reference = estimate_zero3_model_states_mem_needs(
            params.total, params.largest_module, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=False,
            cpu_offload_params=False)[1]
    else:
        reference = estimate_zero2_model_states_mem_needs(params.total, num_gpus_per_node=8, num_nodes=nodes,
                                                          cpu_offload=False)[1]
    assert ours == pytest.approx(reference, rel=0.05)


def test_zero1_on_one_gpu_matches_deepspeeds_stage_1_and_2_estimator():
    # DeepSpeed's stage_1_and_2 optimizer serves both stages but its estimator is ZeRO-2's; on one GPU the two
    # stages hold the same bytes, so that is where stage 1 can be compared like with like.
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    cfg = load_config(ROOT / "configs/gpt3_125m.yaml", ["model.n_layer=2"]).model
    reference = _all_live_gpu_gib(estimate_zero2_model_states_mem_needs_all_live, GPT(cfg), 1,
                                  "offload_optimizer=none", gpus_per_node=1)
    assert pm.model_state_bytes(pm.count_params(cfg), 1, 1) / 2**30 == pytest.approx(reference, rel=0.05)


def test_each_zero_stage_holds_less_per_gpu_than_the_one_before():
    params = pm.count_params(load_config(ROOT / "configs/gpt3_1.3b.yaml").model)
    states = [pm.model_state_bytes(params, z, 64) for z in range(4)]
    assert states == sorted(states, reverse=True) and len(set(states)) == 4
    assert states[0] == 20 * params.total  # unpartitioned: 2 + 2 + 16 bytes per parameter


# ---- activations vs the bytes autograd actually saves ----
def _measured_saved_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves during forward+loss, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    return sum(saved.values())


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_activation_formula_matches_saved_tensor_bytes(attention):
    # Dropout 0, as the GPT-3 configs: with dropout the CPU keeps fp32 masks (CUDA: 1-byte bool) and its
    # sdpa falls back to math attention (CUDA's flash kernels drop in-kernel): CPU would not measure a GPU.
    torch.manual_seed(torch.seed() % 2**31)
    cfg = ModelConfig(**SMALL, attention=attention, dropout=0.0)
    model = GPT(cfg).train()
    batch = 4
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    measured = _measured_saved_bytes(model, idx)
    planned = pm.saved_activation_bytes(cfg, batch, e=4, checkpointing=False)
    assert planned == pytest.approx(measured, rel=0.20)


def test_checkpointing_keeps_only_block_inputs():
    cfg = load_config(ROOT / "configs/gpt3_13b.yaml").model
    full = pm.saved_activation_bytes(cfg, 1, 2, checkpointing=False)
    kept = pm.saved_activation_bytes(cfg, 1, 2, checkpointing=True)
    head = pm.head_saved_bytes(cfg, 1, 2)
    assert kept - head == cfg.n_layer * cfg.block_size * cfg.n_embd * 2
    assert (full - head) / (kept - head) == pytest.approx(16, rel=0.02)  # 16 s·b·h elements per block


# ---- the command ----
def test_175b_on_1024_h100_prints_a_full_table(capsys):
    assert planner.main([f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "1024", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    for needed in ["params", "FLOPs", "zero0", "zero1", "zero2", "zero3", "choice", "tokens/day", "WARNING"]:
        assert needed in out
    assert "ZeRO-3" in out.split("choice")[1]


def test_json_output_parses_and_is_consistent(capsys):
    assert planner.main([f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "1024", "--gpu", "H100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    choice, gpu = plan["choice"], plan["gpu"]
    assert choice["zero_stage"] == 3 and choice["memory_gib"] <= gpu["usable_gib"]
    peak = hardware.gpu_by_name("H100").bf16_tflops * 1e12
    assert plan["speed"]["tokens_per_sec"] == pytest.approx(1024 * peak * 0.4 / plan["flops_per_token"])
    tokens_per_sec = plan["speed"]["tokens_per_sec"]
    assert hardware.mfu(tokens_per_sec, plan["flops_per_token"], 1024, peak) == pytest.approx(0.4)


def test_choice_prefers_low_zero_stage_then_no_checkpointing_then_big_micro_batch(capsys):
    # 125M on 8 × 80 GiB: everything fits at ZeRO-0 without checkpointing, so the micro batch grows instead.
    assert planner.main([f"{ROOT}/configs/gpt3_125m.yaml", "--gpus", "8", "--gpu", "H100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    b = plan["choice"]["micro_batch_size"]
    assert plan["choice"]["zero_stage"] == 0 and not plan["choice"]["activation_checkpointing"]
    bigger = [row for row in plan["micro_batches"] if row["micro_batch_size"] > b]
    assert all(row["total_gib"] > plan["gpu"]["usable_gib"] for row in bigger)
    assert plan["batch"]["sequences_per_gpu"] % b == 0


def test_an_explicit_grad_accum_steps_is_planned_with(capsys):
    # without a global batch, train.grad_accum_steps sets the micro-batches per step; the planner took 1
    def planned(*sets):
        args = [f"{ROOT}/configs/gpt3_125m.yaml", "--gpus", "16", "--gpu", "H100", "--json", "--set",
                "train.global_batch_tokens=null", *(arg for item in sets for arg in ("--set", item))]
        assert planner.main(args) == 0
        return json.loads(capsys.readouterr().out)

    one, four = planned(), planned("train.grad_accum_steps=4")
    b = four["choice"]["micro_batch_size"]
    assert four["choice"]["grad_accum_steps"] == four["communication"]["grad_accum_steps"] == 4
    assert four["speed"]["step_seconds"] == pytest.approx(4 * one["speed"]["step_seconds"])
    assert four["speed"]["step_seconds"] == pytest.approx(
        4 * b * 2048 * 16 / four["speed"]["tokens_per_sec"])  # 4 micro batches of b sequences on each GPU
    psi, e = four["params"]["total"], 2  # ZeRO-2: a reduce-scatter per micro-batch, one all-gather
    assert four["communication"]["stages"]["zero2"]["bytes_per_gpu"] == pytest.approx((4 + 1) * psi * e * 15 / 16)


def test_set_is_one_key_per_flag_before_or_after_the_config_as_for_train(capsys):
    # it took several values per --set, so `--set KEY=VALUE CONFIG` swallowed CONFIG ("required: config")
    args = ["--gpu", "H100", "--json", "--set", "model.n_layer=2", f"{ROOT}/configs/gpt3_125m.yaml",
            "--set", "model.n_embd=256", "--set", "model.n_head=4"]
    assert planner.main(args) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["n_layer"], model["n_embd"], model["n_head"]) == (2, 256, 4)


def test_impossible_fit_is_a_one_line_error():
    with pytest.raises(UserError, match="does not fit even with ZeRO-3.*needs [0-9.]+ GiB per GPU"):
        planner.main([f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "8", "--gpu", "H100"])


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown GPU 'V100'.*H100-SXM.*A100-40GB"):
        planner.main([f"{ROOT}/configs/gpt3_125m.yaml", "--gpu", "V100"])


@pytest.mark.parametrize("flag, value", [("--gpu-mem-gib", "0"), ("--gpu-mem-gib", "nan"), ("--peak-tflops", "inf"),
                                         ("--peak-tflops", "-1"), ("--inter-node-gbps", "nan")])
def test_hardware_numbers_that_are_not_finite_and_positive_are_one_line(flag, value):
    """Before, inf TFLOP/s divided by zero, -1 planned negative days and nan GiB 'did not fit'."""
    with pytest.raises(UserError, match=f"^{flag} must be a finite number > 0 \\(got {value}"):
        planner.main([f"{ROOT}/configs/gpt3_125m.yaml", "--gpus", "16", "--gpu", "H100", flag, value])


def test_custom_gpu_from_memory_and_peak(capsys):
    args = [f"{ROOT}/configs/gpt3_125m.yaml", "--gpus", "8", "--gpu-mem-gib", "24", "--peak-tflops", "100"]
    args.append("--json")
    assert planner.main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu"]["name"] == "custom" and plan["gpu"]["usable_gib"] == pytest.approx(24 * 0.9)


def test_write_updates_only_the_planned_keys(tmp_path, capsys):
    original = (ROOT / "configs" / "gpt3_125m.yaml").read_text()
    copy = tmp_path / "gpt3_125m.yaml"
    (tmp_path / "gpt3_base.yaml").write_text((ROOT / "configs" / "gpt3_base.yaml").read_text())
    changed = original.replace("micro_batch_size: ", "micro_batch_size: 3 #")
    copy.write_text(changed)
    args = [str(copy), "--gpus", "8", "--gpu-mem-gib", "24", "--peak-tflops", "100"]
    assert planner.main([*args, "--write"]) == 0
    text = copy.read_text()
    # every other line as it was (comments, number formats, order); the planned value replaced in its own line
    def others(t):
        return [line for line in t.split("\nplanner:")[0].splitlines() if "micro_batch_size" not in line]
    assert others(text) == others(changed)
    micro = load_config(copy).train.micro_batch_size
    assert f"\n  micro_batch_size: {micro} #32\n" in text  # the value replaced in its line, its comment kept
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {copy}: deepspeed.zero_stage=")
    written, source = load_config(copy), load_config(ROOT / "configs" / "gpt3_125m.yaml")
    assert written.model == source.model and written.data == source.data
    assert written.train.model_copy(update={"micro_batch_size": 1}) == source.train.model_copy(
        update={"micro_batch_size": 1})
    capsys.readouterr()
    assert planner.main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["choice"]["micro_batch_size"] == written.train.micro_batch_size
    planned = written.planner
    assert (planned.gpus, planned.gpu_mem_gib, planned.peak_tflops, planned.gpu) == (8, 24, 100, None)
    assert copy.read_text().startswith(original.split("\nbase:")[0])  # the header comments are kept


def _config_copy(tmp_path, text=None):
    (tmp_path / "gpt3_base.yaml").write_text((ROOT / "configs" / "gpt3_base.yaml").read_text())
    copy = tmp_path / "gpt3_125m.yaml"
    copy.write_bytes((text or (ROOT / "configs" / "gpt3_125m.yaml").read_text()).encode())
    return copy, [str(copy), "--gpus", "8", "--gpu-mem-gib", "24", "--peak-tflops", "100", "--write"]


def test_write_refuses_a_section_written_on_one_line_naming_it(tmp_path, capsys):
    copy, args = _config_copy(tmp_path)
    text = copy.read_text().replace("deepspeed:\n  zero_stage: 0\n", "deepspeed: {zero_stage: 0}\n")
    copy.write_text(text)
    line = text.splitlines().index("deepspeed: {zero_stage: 0}") + 1
    says = rf"^{re.escape(str(copy))}, line {line}: --write edits `deepspeed:` as a block"
    with pytest.raises(UserError, match=says):
        planner.main(args)
    assert copy.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["gpt3_125m.yaml",
                                                                                    "gpt3_base.yaml"]


def test_write_keeps_a_crlf_files_line_endings_on_the_lines_it_sets(tmp_path, capsys):
    original = (ROOT / "configs" / "gpt3_125m.yaml").read_text()
    assert "\n  micro_batch_size: " in original  # the key is set in its own line
    copy, args = _config_copy(tmp_path, original.replace("\n", "\r\n"))
    assert planner.main(args) == 0
    written = copy.read_bytes().decode()
    assert written.count("\n") == written.count("\r\n") >= original.count("\n")  # the planner: section's too
    assert f"\n  micro_batch_size: {load_config(copy).train.micro_batch_size}\r\n" in copy.read_bytes().decode()


# ---- hardware ----
@pytest.mark.parametrize("device_name,expected", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H100 NVL", "H100-NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"), ("NVIDIA GeForce RTX 4090", None)])
def test_device_names_map_to_the_gpu_table(device_name, expected):
    gpu = hardware.gpu_from_device_name(device_name)
    assert (gpu.name if gpu else None) == expected


def test_mfu_and_peak_flops():
    assert hardware.mfu(1000.0, 6e9, 8, None) is None
    assert hardware.mfu(1000.0, 6e9, 8, 1e12) == pytest.approx(1000 * 6e9 / 8e12)
    assert hardware.peak_flops("bf16", override=5e14) == 5e14
    if not torch.cuda.is_available():
        assert hardware.peak_flops("bf16") is None
