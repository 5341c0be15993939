"""The kernels under torch.compile on CPU, compiled for Hopper without one, and their autotune search."""

import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.model import GPT


def tiny_gpt(attention: str, norm: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, attention=attention, norm=norm)
    return GPT(cfg)


def loss_and_grads(model, fn, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = fn(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fullgraph_compile_of_the_triton_gpt_matches_eager_and_sdpa():
    """fullgraph=True fails on any graph break: the custom ops and their autograd must trace whole."""
    g = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 50, (2, 13), generator=g) for _ in range(2))  # T=13: not a tile multiple
    model = tiny_gpt("triton", "triton")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = loss_and_grads(model, compiled, idx, targets)
    loss_e, grads_e = loss_and_grads(model, model, idx, targets)
    plain = tiny_gpt("sdpa", "torch")
    loss_p, grads_p = loss_and_grads(plain, plain, idx, targets)
    assert loss_c.item() == pytest.approx(loss_e.item(), abs=1e-6)
    assert loss_c.item() == pytest.approx(loss_p.item(), abs=1e-5)
    for name, grad in grads_c.items():
        torch.testing.assert_close(grad, grads_e[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grads_p[name], rtol=1e-4, atol=1e-5)


def test_fullgraph_compile_with_attention_dropout_draws_the_same_masks_as_eager():
    """The per-call seed comes from torch's generator inside the graph: same RNG state, same masks."""
    g = torch.Generator().manual_seed(2)
    idx, targets = (torch.randint(0, 50, (2, 16), generator=g) for _ in range(2))
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.2,
                      attention="triton", norm="triton")
    model = GPT(cfg).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, model, model):
        torch.manual_seed(123)
        results.append(loss_and_grads(model, fn, idx, targets))
    torch.manual_seed(124)
    other = loss_and_grads(model, model, idx, targets)[0]
    (loss_c, grads_c), (loss_e, grads_e), (loss_again, _) = results
    assert loss_e.item() == loss_again.item() != other.item()  # dropout is on and follows the seed
    assert loss_c.item() == pytest.approx(loss_e.item(), abs=1e-6)
    for name, grad in grads_c.items():
        torch.testing.assert_close(grad, grads_e[name], rtol=1e-5, atol=1e-6)


def test_compile_traces_the_ops_without_running_triton():
    """Fake (meta) tensors flow through both ops: the shapes torch.compile sees are the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels

    with FakeTensorMode():
        q = torch.empty(2, 3, 40, 48)
        x = torch.empty(5, 7, 1000, dtype=torch.float16)
        w = torch.empty(1000, dtype=torch.float16)
        out = kernels.causal_attention(q, q, q, dropout_p=0.1, seed=3)
        y = kernels.layer_norm(x, w, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert y.shape == x.shape and y.dtype == x.dtype


# ----------------------------------------------------------------------------------------------------
# Compiled for the H100 (sm_90) without one: Triton's compiler and its bundled ptxas need no GPU
# ----------------------------------------------------------------------------------------------------
def test_compile_check_cli_writes_its_report(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}  # as under pytest: the tool must compile regardless
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--kernel", "ln_column_sum",
                             "--dtype", "fp32", "--quick", "--jobs", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ln_column_sum" in result.stdout and "1 compiles for sm_90" in result.stdout
    report = json.loads((tmp_path / "compile_check.json").read_text())
    assert report["arch"] == 90 and [r["status"] for r in report["results"]] == ["ok"]
    assert (tmp_path / "compile_check.csv").read_text().startswith("kernel,")


# ----------------------------------------------------------------------------------------------------
# The autotune search: pruned by default (a cold first step in under a minute), full on request
# ----------------------------------------------------------------------------------------------------
def _tile(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


ATTENTION_LISTS = [(kernel, block_d, dropout, fp32) for kernel in ("fwd", "dkdv", "dq") for block_d in (16, 32, 64, 128)
                   for dropout in (False, True) for fp32 in (False, True)]


@pytest.mark.parametrize("kernel,block_d,dropout,fp32", ATTENTION_LISTS)
def test_pruned_attention_search_is_at_most_8_valid_configs_of_the_full_one(kernel, block_d, dropout, fp32):
    from kernels import attention, tuning

    tuned = attention.TUNED["pruned"][kernel]
    meta = dict(HEAD_DIM=block_d, BLOCK_D=block_d, DROPOUT=dropout, PRECISION="ieee" if fp32 else "tf32")
    tried = [_tile(c) for c in tuned.early_config_prune(tuned.configs, {}, **meta)]  # what the autotuner times
    assert 1 <= len(tried) <= 8 and len(set(tried)) == len(tried)
    assert set(tried) <= {_tile(c) for c in tuning.ATTENTION_CONFIGS[kernel]}
    for m, n, _, _ in tried:  # the kernels' own tile contracts (diagonal bookkeeping)
        assert (n % m == 0) if kernel == "dkdv" else (m % n == 0)


@pytest.mark.parametrize("block_c", [2**k for k in range(17)])
def test_pruned_layer_norm_search_keeps_1_to_3_warp_counts_for_every_row_length(block_c):
    import importlib

    from kernels import tuning

    ln = importlib.import_module("kernels.layer_norm")
    tuned = ln.TUNED["pruned"]["fwd"]
    warps = [c.num_warps for c in tuned.early_config_prune(tuned.configs, {}, BLOCK_C=block_c)]
    assert 1 <= len(warps) <= 3 and set(warps) <= set(tuning.WARPS)
    if block_c >= 16384:  # the row spills with fewer (docs/kernels.md): 32 warps must stay in the search
        assert 32 in warps


def test_full_tuning_restores_the_wide_search():
    import importlib

    from kernels import attention
    from kernels.compile_check import Case, config_count

    ln = importlib.import_module("kernels.layer_norm")
    for kernel, count in (("fwd", 30), ("dkdv", 16), ("dq", 16)):
        assert len(attention.TUNED["full"][kernel].configs) == count
        assert attention.TUNED["full"][kernel].early_config_prune is None
    assert all(ln.TUNED["full"][k].early_config_prune is None and len(ln.TUNED["full"][k].configs) == 5
               for k in ("fwd", "bwd"))
    assert config_count(Case("attn_fwd", "bf16", 64, tuning="full")) == 30
    assert config_count(Case("attn_fwd", "bf16", 64, tuning="pruned")) <= 8


def test_model_kernel_tuning_reaches_both_kernels_and_rejects_unknown_values():
    import kernels

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, attention="triton",
                      norm="triton", kernel_tuning="full")
    model = GPT(cfg)
    block = model.transformer.h[0]
    assert block.attn.attend.keywords["tuning"] == "full"
    assert block.ln_1.tuning == model.transformer.ln_f.tuning == "full"
    assert GPT(cfg.model_copy(update={"kernel_tuning": "pruned"})).transformer.h[0].ln_2.tuning == "pruned"
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="tuning must be one of pruned, full"):
        kernels.causal_attention(q, q, q, tuning="fast")
    with pytest.raises(ValueError, match="tuning must be one of pruned, full"):
        kernels.layer_norm(q, None, None, tuning="wide")


def test_first_step_lists_every_kernel_the_step_launches():
    from kernels.compile_check import FirstStep, config_count, parse_first_step

    step = parse_first_step("T=256,D=64,C=384,dropout=0.2,dtype=bf16")
    assert step == FirstStep(T=256, D=64, C=384, dtype="bf16", dropout=0.2, bias=False)
    cases = step.cases("pruned")
    assert {c.kernel for c in cases} == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_delta", "ln_fwd",
                                         "ln_bwd", "ln_column_sum"}
    assert all(c.dropout for c in cases if c.kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"))
    assert all(c.seq_len == 256 and c.size == 64 for c in cases if c.kernel.startswith("attn"))
    assert all(c.size == 384 and not c.bias for c in cases if c.kernel.startswith("ln"))
    pruned = sum(config_count(c) for c in cases)
    assert pruned < sum(config_count(c) for c in step.cases("full")) == 74


def _smallest_config(case) -> int:
    """Index, in the case's pruned list, of the config with the least shared memory (tile area x stages)."""
    from kernels.compile_check import _launch

    configs = _launch(case)[1]
    if case.kernel.startswith("ln"):
        return 0
    sizes = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages for c in configs]
    return sizes.index(min(sizes))


@pytest.mark.slow  # 21 real compiles: 30-45 s on 2 cores
def test_every_kernel_compiles_for_hopper_and_every_pruned_list_fits_at_its_largest_shapes():
    """The interpreter never lowers a kernel: this does, to a cubin, as the autotuner would.

    Shared memory grows with the head dim and dropout, so each pruned list's smallest tile is compiled at the
    largest head dim of its class (narrow: D = 64, wide: D = 128), and LayerNorm at C = 65536 with a bias; any T
    is a runtime argument. Beside them, what only these shapes reach: a padded head dim (48, in fp16), the
    backward's delta and column-sum kernels, and LayerNorm's 16-warp config of the full search. fp32's lists:
    the heavy test below."""
    from dataclasses import replace

    from kernels.compile_check import SHARED_LIMIT, Case, run, unrunnable

    attention = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
    cases = [Case(k, "bf16", D, dropout) for k in attention for D in (64, 128) for dropout in (False, True)]
    cases += [Case(k, "bf16", 65536, bias=True) for k in ("ln_fwd", "ln_bwd")]
    cases = [replace(c, config=_smallest_config(c)) for c in cases]
    cases += [Case(k, "fp16", 48, False) for k in attention]  # padded D, the first config
    cases += [Case("attn_bwd_delta", "bf16", 80), Case("ln_column_sum", "bf16", 1000)]
    cases += [Case(k, "fp16", 16384, config=3, tuning="full") for k in ("ln_fwd", "ln_bwd")]  # 16 warps
    results = run(cases, arch=90, jobs=2, one_config=True, progress=False)
    assert [r.case for r in results] == cases and not unrunnable(results)
    for r in results:
        assert r.status in ("ok", "spills") and 0 < r.registers <= 255 and r.shared <= SHARED_LIMIT[90], r
        if r.case.kernel in attention:
            assert r.wgmma, f"{r.case}: the dots did not become Hopper wgmma"


@pytest.mark.heavy  # 3 compiles of 20-45 s each: `python -m pytest -m heavy` (docs/benchmarks.md has its result)
def test_fp32_pruned_lists_fit_hopper_at_head_dim_128_with_dropout():
    """fp32's IEEE dots spill heavily, so these compiles take minutes: the lists are one small tile each."""
    from kernels.compile_check import Case, run, unrunnable

    cases = [Case(k, "fp32", 128, True) for k in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")]
    results = run(cases, arch=90, jobs=2, one_config=True, progress=False)
    assert not unrunnable(results) and all(r.status in ("ok", "spills") for r in results)
