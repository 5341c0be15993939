"""The decoder-only GPT of "Let's build GPT": only the model, nothing of training, data or files."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megagpt.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Backends: the one spot where `attention` and `norm` are chosen; the rest of the model never branches.
# Every attention function takes q, k, v of shape (B, nh, T, hs) and returns (B, nh, T, hs), causal; `scale`
# multiplies the scores (None: 1/√hs).
# ---------------------------------------------------------------------------------------------
def _math_attention(q, k, v, dropout_p: float, scale: float | None = None):
    # The spelled-out version: scores, causal mask, softmax, dropout on the weights, weighted sum.
    T = q.size(-2)
    scale = (1.0 / math.sqrt(q.size(-1))) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)  # bf16/fp16 scores: the softmax in fp32
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


# On a CPU, torch's flash attention is slow in bf16/fp16 at short contexts, its backward most (forward + backward
# 3.0 ms against the spelled-out version's 0.6 ms at the CPU config's shape, B 12, 4 heads, T 64, head 32), while
# the spelled-out version's bf16 matrix products are fast. It still wins at T 256 (5.5 ms against 9.0), flash at
# T 1024 (36 against 69): docs/benchmarks.md, "Side by side with nanoGPT: 1.75-2.03× on a CPU with native
# bf16".
CPU_LOW_PRECISION_SPELLED_OUT_MAX_T = 256


def _sdpa_attention(q, k, v, dropout_p: float, scale: float | None = None):
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.size(-2) <= CPU_LOW_PRECISION_SPELLED_OUT_MAX_T):
        return _math_attention(q, k, v, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)


def _kernels():
    """The kernels package, imported when a triton backend is chosen (only those need triton), so, on a CPU, at
    model build: before DeepSpeed or inductor import triton, which would leave its interpreter off."""
    import kernels

    return kernels


def _triton_attention(q, k, v, dropout_p: float, scale: float | None = None, tuning: str = "pruned"):
    return _kernels().causal_attention(q, k, v, softmax_scale=scale, dropout_p=dropout_p, tuning=tuning)


ATTENTION_BACKENDS = {"math": _math_attention, "sdpa": _sdpa_attention, "triton": _triton_attention}


def attention_backend(cfg: ModelConfig):
    """cfg.attention's function with the parametrization's score scale; the triton one searches tiles as
    cfg.kernel_tuning says."""
    if cfg.attention == "triton":
        _kernels()
        return functools.partial(_triton_attention, scale=attention_scale(cfg), tuning=cfg.kernel_tuning)
    return functools.partial(ATTENTION_BACKENDS[cfg.attention], scale=attention_scale(cfg))


def attention_scale(cfg: ModelConfig) -> float | None:
    """µP scales the scores by 1/d_head (q and k become correlated as they learn, so q·k grows like d_head);
    standard: None, every backend's own 1/√d_head."""
    return 1.0 / cfg.head_dim if cfg.parametrization == "mup" else None


class TritonLayerNorm(nn.LayerNorm):
    """nn.LayerNorm's parameters and state dict, with the fused Triton kernel for the maths."""

    def __init__(self, *args, tuning: str = "pruned", **kwargs):
        super().__init__(*args, **kwargs)
        self.tuning = tuning
        _kernels()

    def forward(self, x):
        return _kernels().layer_norm(x, self.weight, self.bias, self.eps, tuning=self.tuning)


def make_norm(cfg: ModelConfig) -> nn.LayerNorm:
    if cfg.norm == "triton":
        return TritonLayerNorm(cfg.n_embd, bias=cfg.bias, tuning=cfg.kernel_tuning)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def cached_attention(q, k, v, past_len: int, scale: float | None = None):
    """Attention of T new queries over past_len cached + T new keys (inference only, no dropout)."""
    T, S = q.size(-2), k.size(-2)
    if T == 1:  # one new token sees everything before it: no mask needed
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


# ---------------------------------------------------------------------------------------------
# Parametrization: which weights are hidden matrices, and their init (µP's table is in docs/mup.md)
# ---------------------------------------------------------------------------------------------
def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A matrix inside the blocks (width x width-ish): µP gives it variance σ²/m and LR lr/m. Embeddings (the
    head is tied to wte), norms and biases are not."""
    return p.dim() >= 2 and (name.startswith("transformer.h.") or ".transformer.h." in name)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Every weight matrix and embedding ~ N(0, σ²), biases 0, norm gains 1; then GPT-2 draws the residual
    projections again with σ/√(2·n_layer), so the residual stream's variance does not grow with depth (two
    residual additions per block); µP divides each hidden matrix's variance by m = n_embd / mup_base_width
    (by scaling the draws: at m = 1 the weights are the standard ones, bit for bit)."""
    model.apply(functools.partial(_init_module, std=cfg.init_std))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if cfg.parametrization == "mup" and is_hidden_matrix(name, p):
            p.mul_(1.0 / math.sqrt(cfg.mup_width_multiplier))


def _init_module(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, for incremental decoding."""

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def past_length(self, layer: int = 0) -> int:
        past = self.layers[layer]
        return 0 if past is None else past[0].size(-2)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.layer = cfg.n_head, layer
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        self.attend, self.scale = attention_backend(cfg), attention_scale(cfg)

    def forward(self, x, cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = self.attend(q, k, v, self.dropout if self.training else 0.0)
        else:
            past_len = cache.past_length(self.layer)
            k, v = cache.extend(self.layer, k, v)
            y = cached_attention(q, k, v, past_len, self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: communication (attention) then computation (MLP), each residual."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "model.vocab_size is not set: take it from the dataset manifest before building GPT"
            )
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
                ln_f=make_norm(cfg),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        # µP's multipliers (1 under the standard parametrization, and then not applied at all)
        mup = cfg.parametrization == "mup"
        self.input_multiplier = cfg.mup_input_alpha if mup else 1.0
        self.output_multiplier = cfg.mup_output_alpha / cfg.mup_width_multiplier if mup else 1.0
        init_weights(self, cfg)

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        B, T = idx.size()
        start = cache.past_length() if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than model.block_size={self.cfg.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        if self.input_multiplier != 1.0:
            x = x * self.input_multiplier
        for block in self.transformer.h:
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        x = self.transformer.ln_f(x)
        if self.output_multiplier != 1.0:  # µP's α_out/m on the logits, applied to their (narrower) input
            x = x * self.output_multiplier
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without position embeddings by default, as nanoGPT counts (wte is tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg, self.num_params(non_embedding=True))


def flops_per_token(cfg: ModelConfig, params: int) -> float:
    """Training FLOPs per token, PaLM accounting: 6·N + 12·L·T·d for attention, N the parameters without the
    position embeddings (wte stays in N: it doubles as the output layer, whose matmul costs FLOPs). The one
    formula: MFU in training and the planner both call it."""
    return 6 * params + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd
