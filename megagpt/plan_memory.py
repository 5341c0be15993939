"""The model maths of `megagpt plan`: parameters, FLOPs, model-state and activation bytes per GPU.

Model states follow DeepSpeed's ZeRO optimizers with mixed precision and Adam, per parameter:
  2 B 16-bit weights, 2 B 16-bit gradients, and 16 B of optimizer state: 4 fp32 master weights + 4 Adam m
  + 4 Adam v + 4 the fp32 copy of the gradient partition DeepSpeed builds for the step (its own estimators
  count it: their "18" = 2 grads16 + 4 grads32 + 4 params32 + 8 m,v). ZeRO-1 partitions the 16 B over the
  data-parallel GPUs, ZeRO-2 also the 16-bit gradients, ZeRO-3 also the 16-bit weights, and then needs the
  largest module's weights gathered (4 B per parameter: 16-bit, double-buffered for prefetch).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
derived for this model (megagpt/model.py, pre-LN, GELU MLP of 4h) and in elements so that any dtype can be
costed; s = block size, b = micro batch, h = width, a = heads, V = vocab, e = bytes per element:
  per layer, saved for the backward: 16·s·b·h elements = LN1 in 1 + LN1 out 1 + q,k,v 3 + attention out
  (c_proj's input; flash-style backward keeps the same tensor) 1 + LN2 in 1 + LN2 out 1 + GELU in 4
  + GELU out 4: 32·s·b·h bytes at e=2, Korthikanti's 34 less the two 1-byte dropout masks;
  fused/flash attention (sdpa, triton) adds only its fp32 log-sum-exp 4·b·a·s bytes;
  "math" attention also keeps the softmax a·s²·b·e and the causal mask s² bytes (Korthikanti's 5as/h term,
  without dropout); dropout > 0 adds 1-byte masks (2·s·b·h, and a·s²·b plus the dropped a·s²·b·e for math).
  Head: ln_f in and out 2·s·b·h·e, the fp32 log-probabilities 4·s·b·V.
  Full activation checkpointing keeps only each block's input s·b·h·e, plus one block recomputed in backward.
  Transient on top (the peak is at the loss / early backward): the logits the caller holds e·s·b·V, one fp32
  copy or gradient of them 4·s·b·V, and the MLP's 4h gradients 2·4·s·b·h·e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megagpt.config import ModelConfig
from megagpt.model import GPT
from megagpt.model import flops_per_token as model_flops_per_token

BYTES_16BIT_WEIGHTS = 2
BYTES_16BIT_GRADS = 2
BYTES_OPTIMIZER = 16  # fp32 master 4 + Adam m 4 + Adam v 4 + fp32 gradient partition 4
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCount:
    total: int  # every trainable parameter once (wte is tied to lm_head)
    non_embedding: int  # total less token and position embeddings
    largest_module: int  # the most parameters one module holds directly (what ZeRO-3 gathers at once)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count by building the model on the meta device: shapes only, no memory, any size."""
    with torch.device("meta"):
        model = GPT(cfg)
    total = model.num_params(non_embedding=False)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCount(total=total, non_embedding=total - embeddings, largest_module=largest)


def closed_form_params(cfg: ModelConfig) -> int:
    """V·d + T·d embeddings, per block 12d² (+2d LN weights, +11d biases), final LN d (+d)."""
    d, L = cfg.n_embd, cfg.n_layer
    per_block = 12 * d * d + 2 * d + (11 * d if cfg.bias else 0)
    return cfg.vocab_size * d + cfg.block_size * d + L * per_block + d * (2 if cfg.bias else 1)


def flops_per_token(cfg: ModelConfig, params: ParamCount) -> float:
    """megagpt.model.flops_per_token on the counted parameters (all but the position embeddings)."""
    return model_flops_per_token(cfg, params.total - cfg.block_size * cfg.n_embd)


def model_state_bytes(params: ParamCount, zero_stage: int, data_parallel: int) -> float:
    """Bytes per GPU of weights, gradients and optimizer state under ZeRO stage 0-3 (see the docstring)."""
    P, N = params.total, data_parallel
    weights = BYTES_16BIT_WEIGHTS * P / (N if zero_stage >= 3 else 1)
    grads = BYTES_16BIT_GRADS * P / (N if zero_stage >= 2 else 1)
    optimizer = BYTES_OPTIMIZER * P / (N if zero_stage >= 1 else 1)
    gathered = 2 * BYTES_16BIT_WEIGHTS * params.largest_module if zero_stage >= 3 else 0
    return weights + grads + optimizer + gathered


def layer_saved_bytes(cfg: ModelConfig, micro_batch: int, e: int) -> float:
    """What one block keeps for its backward (see the docstring)."""
    s, b, h, a = cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head
    total = 16 * s * b * h * e + 2 * 2 * 4 * s * b  # + LayerNorm mean and rstd in fp32
    if cfg.attention == "math":
        total += a * s * s * b * e + s * s
    else:
        total += 4 * b * a * s
    if cfg.dropout > 0:
        total += 2 * s * b * h + (a * s * s * b * (1 + e) if cfg.attention == "math" else 0)
    return total


def head_saved_bytes(cfg: ModelConfig, micro_batch: int, e: int) -> float:
    """Embedding indices, ln_f in and out, and the fp32 log-probabilities of the loss."""
    s, b, h = cfg.block_size, micro_batch, cfg.n_embd
    dropout_mask = s * b * h if cfg.dropout > 0 else 0
    return 2 * s * b * h * e + 4 * s * b * cfg.vocab_size + 2 * 8 * s * b + dropout_mask


def saved_activation_bytes(cfg: ModelConfig, micro_batch: int, e: int, checkpointing: bool) -> float:
    """Bytes autograd holds at the end of the forward: the figure a saved-tensor count measures."""
    if checkpointing:
        layers = cfg.n_layer * cfg.block_size * micro_batch * cfg.n_embd * e
    else:
        layers = cfg.n_layer * layer_saved_bytes(cfg, micro_batch, e)
    return layers + head_saved_bytes(cfg, micro_batch, e)


def activation_bytes(cfg: ModelConfig, micro_batch: int, e: int, checkpointing: bool) -> float:
    """Planned peak activation memory: saved tensors, the block recomputed under checkpointing, transients."""
    s, b, h = cfg.block_size, micro_batch, cfg.n_embd
    recompute = layer_saved_bytes(cfg, micro_batch, e) if checkpointing else 0
    transient = s * b * cfg.vocab_size * (e + 4) + 2 * 4 * s * b * h * e
    return saved_activation_bytes(cfg, micro_batch, e, checkpointing) + recompute + transient
