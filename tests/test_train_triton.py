"""The model with the Triton kernels trains like the plain-torch model (kernels under the interpreter on CPU)."""

import os
import runpy
import subprocess
import sys

import pytest
import torch
from helpers import CPU_CONFIG, REPO, tiny_overrides, train_records
from torch._dynamo.utils import counters

from megagpt.config import load_config
from megagpt.train import train


def test_triton_backends_follow_the_sdpa_run_for_ten_steps(shakespeare_dataset, tmp_path):
    small = tiny_overrides(
        shakespeare_dataset,
        max_steps=10,
        micro_batch_size=2,
        sample_tokens=0,
        eval_steps=1,
        eval_interval=100,
        checkpoint_interval=100,
        lr=3e-3,
    )
    # One layer: its step still chains every kernel both ways (LayerNorm into attention, their backwards into each
    # other); a second layer repeats the same kernels and doubled the interpreter's time.
    small += ["model.block_size=16", "model.n_layer=1"]
    runs = {}
    for attention, norm in [("sdpa", "torch"), ("triton", "triton")]:
        cfg = load_config(CPU_CONFIG, [*small, f"model.attention={attention}", f"model.norm={norm}"])
        train(cfg, tmp_path / attention)
        runs[attention] = [r["loss"] for r in train_records(tmp_path / attention)]
    assert len(runs["triton"]) == 10
    assert runs["triton"][-1] < runs["triton"][0]  # it trains
    for step, (a, b) in enumerate(zip(runs["triton"], runs["sdpa"], strict=True), start=1):
        assert a == pytest.approx(b, abs=1e-4), f"step {step}"

    # sampled on a CPU, the triton run's model is SDPA's and torch's LayerNorm: the same function, not the kernels
    # under the interpreter (minutes for a sample)
    from megagpt.inference import load_for_inference, run_config
    from megagpt.model import GPT

    model, _, cfg = load_for_inference(tmp_path / "triton", device="cpu")
    assert (cfg.model.attention, cfg.model.norm) == ("sdpa", "torch")
    assert not any(type(m).__name__ == "TritonLayerNorm" for m in model.modules())
    kernels = GPT(run_config(tmp_path / "triton", "step_000010").model).eval()
    kernels.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], kernels(idx)[0], atol=1e-5, rtol=1e-5)


def test_train_compile_with_triton_backends_matches_eager(shakespeare_dataset, tmp_path):
    """`train.compile: true` goes through DeepSpeed's engine.compile (inductor); the custom ops stay opaque."""
    small = tiny_overrides(shakespeare_dataset, max_steps=3, micro_batch_size=2, sample_tokens=0, eval_steps=1,
                           eval_interval=100, checkpoint_interval=100)
    small += ["model.block_size=16", "model.n_layer=1", "model.attention=triton", "model.norm=triton"]  # as above
    runs, graphs = {}, {}
    for compiled in (False, True):
        cfg = load_config(CPU_CONFIG, [*small, f"train.compile={str(compiled).lower()}"])
        torch._dynamo.reset()
        counters.clear()
        train(cfg, tmp_path / str(compiled))
        runs[compiled] = [r["loss"] for r in train_records(tmp_path / str(compiled))]
        graphs[compiled] = counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] >= 1, graphs  # the compiled run really went through dynamo
    assert len(runs[True]) == 3
    for step, (a, b) in enumerate(zip(runs[True], runs[False], strict=True), start=1):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU's path")
def test_triton_model_runs_on_cpu_when_triton_is_imported_after_the_model_is_built():
    """deepspeed.initialize imports triton after the model is built: the kernels must be imported (and the
    interpreter switched on) by then. `megagpt train` with triton backends on a CPU died in the interpreter."""
    code = ("import torch; from megagpt.config import ModelConfig; from megagpt.model import GPT\n"
            "cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=11, attention='triton', "
            "norm='triton')\n"
            "model = GPT(cfg)\n"
            "import triton  # as deepspeed.initialize does\n"
            "idx = torch.randint(0, 11, (1, 8)); model(idx, idx); print('ran')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "ran" in result.stdout, result.stderr[-2000:]


def test_kernels_refuse_to_load_after_triton_where_the_interpreter_is_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ImportError, match="triton was imported before kernels.*TRITON_INTERPRET=1"):
        runpy.run_path(str(REPO / "kernels" / "__init__.py"))
