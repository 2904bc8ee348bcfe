"""Hand-written baselines (no efformer machinery) that benchmarks compare efformer against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def raw_sdpa_attention(x: torch.Tensor, wq: torch.Tensor, wkv: torch.Tensor, wo: torch.Tensor, heads: int,
                       causal: bool) -> torch.Tensor:
    """q/kv/out projections by the given weights around ``scaled_dot_product_attention``: (b, n, d) -> (b, n, d)."""
    b, n, d = x.shape
    q = F.linear(x, wq).view(b, n, heads, d // heads).transpose(1, 2)
    k, v = F.linear(x, wkv).view(b, n, 2 * heads, d // heads).transpose(1, 2).chunk(2, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.linear(o.transpose(1, 2).reshape(b, n, d), wo)


class RawAttention(nn.Module):
    """q/kv/out projections around ``scaled_dot_product_attention``: (b, n, d) -> (b, n, d)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        self.h, self.causal = n_heads, causal
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, d) -> (b, n, d)."""
        return raw_sdpa_attention(x, self.q.weight, self.kv.weight, self.out.weight, self.h, self.causal)


def raw_attention_layer(d_model: int, n_heads: int, causal: bool) -> RawAttention:
    """A raw SDPA attention layer."""
    return RawAttention(d_model, n_heads, causal)
