"""`megagpt plan`'s communication: ZeRO's bytes per GPU against the ZeRO paper, link times, verdict, remedies."""

import json
from pathlib import Path

import pytest

from megagpt import plan as planner
from megagpt import plan_comm as pc
from megagpt import plan_memory as pm
from megagpt.config import load_config
from megagpt.ds_config import deepspeed_config
from megagpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _params(size: str) -> int:
    return pm.count_params(load_config(ROOT / f"configs/gpt3_{size}.yaml").model).total


# ---- the ZeRO paper's accounting (Rajbhandari et al. 2020, §7), written out here on its own ----
def paper_bytes(psi: int, stage: int, n: int, bytes_per_element: int) -> float:
    """§7.2.1: data parallelism all-reduces the gradients, a reduce-scatter and an all-gather of Ψ each: 2Ψ.
    P_os and P_os+g: a reduce-scatter of the gradients and an all-gather of the updated parameters: 2Ψ.
    §7.2.2, P_os+g+p: the parameters all-gathered for the forward and again for the backward, and the
    gradients reduce-scattered: 3Ψ. A ring moves (n - 1)/n of each per process."""
    volume = {0: 2, 1: 2, 2: 2, 3: 3}[stage] * psi
    return volume * (n - 1) / n * bytes_per_element


@pytest.mark.parametrize("size,gpus", [("125m", 8), ("13b", 64), ("175b", 768)])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bytes_per_gpu_match_the_zero_paper_on_three_sizes(size, gpus, stage):
    psi = _params(size)
    assert pc.bytes_per_gpu(psi, stage, gpus, accum=1, e=2) == pytest.approx(paper_bytes(psi, stage, gpus, 2))


def test_zero3_sends_one_and_a_half_times_data_parallel():
    psi = _params("1.3b")
    assert pc.bytes_per_gpu(psi, 3, 32, 1, 2) / pc.bytes_per_gpu(psi, 0, 32, 1, 2) == pytest.approx(1.5)


def test_gradient_accumulation_repeats_only_zero2_and_zero3_collectives():
    # DeepSpeed: ZeRO-0/1 reduce at the accumulation boundary; ZeRO-2/3 reduce-scatter every micro-batch and
    # ZeRO-3 gathers the weights for every micro-batch's forward and backward.
    psi, n, accum = 1_000_000, 16, 4
    ring = (n - 1) / n * 2  # bytes per element sent, per Ψ
    assert pc.bytes_per_gpu(psi, 0, n, accum, 2) == pytest.approx(2 * psi * ring)
    assert pc.bytes_per_gpu(psi, 1, n, accum, 2) == pytest.approx(2 * psi * ring)
    assert pc.bytes_per_gpu(psi, 2, n, accum, 2) == pytest.approx((accum + 1) * psi * ring)
    assert pc.bytes_per_gpu(psi, 3, n, accum, 2) == pytest.approx(3 * accum * psi * ring)


def test_rings_inside_a_node_use_nvlink_and_across_nodes_the_slowest_link():
    net = pc.network_for("H100-SXM")
    assert net.bandwidth(8) == 450e9  # NVLink 4
    assert net.bandwidth(16) == 400e9 / 8  # 8 NDR ports per node, shared by its 8 GPUs
    slow_nvlink = pc.Network(intra_gbytes_per_s=20, inter_gbytes_per_s=400, gpus_per_node=8)
    assert slow_nvlink.bandwidth(64) == 20e9
    a100 = pc.network_for("A100-80GB", gpus_per_node=4, inter=100)
    assert a100.bandwidth(4) == 300e9 and a100.bandwidth(8) == 25e9


def test_zeropp_cuts_the_bytes_crossing_nodes_fourfold():
    # ZeRO++ (Wang et al. 2023): cross-node volume 3Ψ·2 B -> Ψ·1 B (qwZ) + 0 (hpZ) + Ψ·0.5 B (qgZ).
    psi, n, g = _params("175b"), 768, 8

    def cross_node(colls):
        return sum(c.bytes for c in colls if c.group > g)

    plain = cross_node(pc.collectives(psi, 3, n, 1, 2, gpus_per_node=g))
    zeropp = cross_node(pc.collectives(psi, 3, n, 1, 2, frozenset(pc.ZEROPP), gpus_per_node=g))
    assert plain / zeropp == pytest.approx(4.0)


def _plan_json(capsys, *args) -> dict:
    assert planner.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_175b_on_768_h100_is_communication_bound_and_offers_zeropp(capsys):
    plan = _plan_json(capsys, f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "768", "--gpu", "H100")
    comm = plan["communication"]
    choice = comm["choice"]
    psi = plan["params"]["total"]
    assert choice["zero_stage"] == 3 and choice["overlap"]  # DeepSpeed overlaps ZeRO-3 by default
    assert choice["comm_seconds"] == pytest.approx(paper_bytes(psi, 3, 768, 2) / 50e9)
    assert choice["communication_bound"] and choice["comm_seconds"] > choice["compute_seconds"]
    assert choice["step_seconds"] == pytest.approx(max(choice["comm_seconds"], choice["compute_seconds"]))
    keys = {r["key"]: r["value"] for r in comm["remedies"]}
    zero = "deepspeed.extra.zero_optimization."
    assert keys[zero + "zero_hpz_partition_size"] == 8
    assert keys[zero + "zero_quantized_weights"] is True and keys[zero + "zero_quantized_gradients"] is True
    assert comm["with_zeropp"]["step_seconds"] < choice["step_seconds"]
    assert comm["with_zeropp"]["memory_gib"] <= plan["gpu"]["usable_gib"]


def test_table_prints_every_stage_the_verdict_and_the_remedies(capsys):
    assert planner.main([f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "768", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out.split("communication per GPU per step")[1]
    for needed in ["zero0", "zero1", "zero2", "zero3", "COMMUNICATION-BOUND", "with ZeRO++",
                   "--set deepspeed.extra.zero_optimization.zero_hpz_partition_size=8"]:
        assert needed in out


def test_one_node_small_model_is_compute_bound_and_needs_no_remedy(capsys):
    plan = _plan_json(capsys, f"{ROOT}/configs/gpt3_125m.yaml", "--gpus", "8", "--gpu", "H100")
    choice = plan["communication"]["choice"]
    assert not choice["communication_bound"] and not choice["overlap"]  # ZeRO-0 all-reduces after the backward
    assert choice["step_seconds"] == pytest.approx(choice["compute_seconds"] + choice["comm_seconds"])


def test_bandwidth_flags_override_the_gpus_links(capsys):
    args = [f"{ROOT}/configs/gpt3_13b.yaml", "--gpus", "32", "--gpu", "H100"]
    fast = _plan_json(capsys, *args)["communication"]
    slow = _plan_json(capsys, *args, "--inter-node-gbps", "25", "--gpus-per-node", "4")["communication"]
    assert fast["network"]["gbytes_per_s_per_gpu"] == 50 and slow["network"]["gbytes_per_s_per_gpu"] == 25 / 4
    assert slow["choice"]["comm_seconds"] == pytest.approx(fast["choice"]["comm_seconds"] * 8)


def test_zero2_with_accumulation_is_offered_overlap_and_a_larger_micro_batch():
    keys = [r["key"] for r in pc.remedies(2, accum=8, micro_batch=2, overlap=False, gpus=64, gpus_per_node=8,
                                          global_batch_tokens=None)]
    assert keys == ["deepspeed.extra.zero_optimization.overlap_comm", "train.micro_batch_size"]


def test_remedies_pass_through_into_deepspeeds_zero_config_and_the_plan_counts_them(capsys):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = "deepspeed.extra.zero_optimization."
    remedies = [f"{zero}zero_hpz_partition_size=8", f"{zero}zero_quantized_weights=true",
                f"{zero}zero_quantized_gradients=true"]
    cfg = load_config(ROOT / "configs/gpt3_175b.yaml", remedies)
    section = deepspeed_config(cfg, world_size=768)["zero_optimization"]
    assert section["stage"] == 3  # merged into the generated section, not replacing it
    parsed = DeepSpeedZeroConfig(**section)
    assert parsed.zero_hpz_partition_size == 8 and parsed.zero_quantized_weights and parsed.zero_quantized_gradients
    plan = _plan_json(capsys, f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "768", "--gpu", "H100",
                      *(arg for remedy in remedies for arg in ("--set", remedy)))
    comm = plan["communication"]
    assert comm["choice"]["zeropp"] == ["hpZ", "qgZ", "qwZ"] and not comm["remedies"]
    assert not comm["choice"]["communication_bound"]


def test_hpz_turned_on_in_the_config_counts_its_weight_copy_in_the_choice(capsys):
    # before, only the ZeRO++ suggestion counted hpZ's 2Ψ/g: with hpZ in the config the choice said 19.9 GiB
    # (micro batch 2) on a 54 GiB-usable GPU where the run needs 60.5
    hpz = "deepspeed.extra.zero_optimization.zero_hpz_partition_size=8"
    args = [f"{ROOT}/configs/gpt3_175b.yaml", "--gpus", "768", "--gpu", "H100", "--gpu-mem-gib", "60"]
    plain, with_hpz = _plan_json(capsys, *args), _plan_json(capsys, *args, "--set", hpz)
    copy = 2 * with_hpz["params"]["total"] / 8 / 2**30
    zero3 = lambda plan: plan["memory_gib"]["zero3"]["model_states"]
    assert zero3(with_hpz) == pytest.approx(zero3(plain) + copy)
    assert with_hpz["choice"]["memory_gib"] <= with_hpz["gpu"]["usable_gib"] < plain["choice"]["memory_gib"] + copy
    assert with_hpz["choice"]["micro_batch_size"] < plain["choice"]["micro_batch_size"]
    assert with_hpz["communication"]["with_zeropp"]["memory_gib"] == pytest.approx(with_hpz["choice"]["memory_gib"])
    assert planner.main(args) == 0  # and the ZeRO++ suggestion says when its weight copy does not fit
    assert "hpZ's weight copy makes it 60.5 GiB per GPU, more than the 54.0 usable" in capsys.readouterr().out


@pytest.mark.parametrize("value, says", [
    ("zero_optimization=3", "deepspeed.extra.zero_optimization: expected a mapping"),
    ("zero_optimization.zero_hpz_partition_size=abc", "zero_hpz_partition_size: expected a number of GPUs"),
    ("zero_optimization.zero_hpz_partition_size=null", "zero_hpz_partition_size: expected a number of GPUs"),
    # quoted: the text "false", which bool() counted as on (an overlapped step planned for a serial one)
    ("zero_optimization.overlap_comm='false'", r"overlap_comm: expected true or false \(got 'false'\)"),
    ("zero_optimization.zero_quantized_weights=1", r"zero_quantized_weights: expected true or false \(got 1\)"),
])
def test_a_zero_section_the_planner_cannot_read_is_one_line(value, says):
    with pytest.raises(UserError, match=says):  # was a TypeError or AttributeError traceback
        planner.main([f"{ROOT}/configs/gpt3_125m.yaml", "--gpu", "H100", "--set", f"deepspeed.extra.{value}"])
