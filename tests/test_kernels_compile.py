"""The kernels under torch.compile on CPU: opaque custom ops in one graph, the same numbers as eager."""

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
def test_every_kernel_compiles_for_hopper_with_the_launchers_arguments():
    """The interpreter never lowers a kernel: this does, to a cubin, as the autotuner's first config would."""
    from kernels.compile_check import SHARED_LIMIT, Case, run

    cases = [Case(k, "bf16", 128, True) for k in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")]
    cases += [Case(k, "fp16", 48, False) for k in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")]  # padded D
    cases += [Case("attn_bwd_delta", "bf16", 80), Case("ln_column_sum", "bf16", 1000)]
    cases += [Case(k, "bf16", 1000, bias=True) for k in ("ln_fwd", "ln_bwd")]
    cases += [Case(k, "fp16", 16384, config=3) for k in ("ln_fwd", "ln_bwd")]  # 16 warps, weight only
    results = run(cases, arch=90, jobs=2, one_config=True, progress=False)
    assert [r.case for r in results] == cases
    for r in results:
        assert r.status != "error", (r.case, r.error)
        assert 0 < r.registers <= 255 and r.shared <= SHARED_LIMIT[90], r
        if r.case.kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
            assert r.wgmma, f"{r.case}: the dots did not become Hopper wgmma"


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
