"""Plain-torch references for the kernels: the specification the Triton versions are tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.attention import dropout_keep_mask

__all__ = ["causal_attention_reference", "dropout_keep_mask", "layer_norm_reference"]


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               softmax_scale: float | None = None, dropout_mask: torch.Tensor | None = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """Explicit masked softmax over (B, H, T, D); `dropout_mask` (B, H, T, T; True = kept) applies a mask.

    With dropout_p > 0 and no mask, torch's own dropout draws one (not the kernels' mask: see
    dropout_keep_mask, which returns exactly the mask the kernels draw for a seed).
    """
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
    if dropout_mask is not None:
        att = att * dropout_mask.to(att.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, biased variance, in x's dtype."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
