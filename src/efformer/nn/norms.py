"""Normalisation layers: LayerNorm ("Layer Normalization", Ba et al.), RMSNorm
("Root Mean Square Layer Normalization", Zhang & Sennrich) and one-group GroupNorm ("Group
Normalization", Wu & He; PoolFormer's norm in "MetaFormer Is Actually What You Need for Vision")."""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from efformer.options import StrictModel
from efformer.registry import NORMS


class NormOptions(StrictModel):
    """Norms take no options beyond their width."""

    model_config = pydantic.ConfigDict(extra="forbid")


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim: (..., d) -> (..., d)."""

    Options = NormOptions

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__(d_model, eps=eps)


@NORMS.register("rmsnorm")
class RMSNorm(nn.RMSNorm):
    """RMSNorm over the last dim (no mean subtraction, no bias): (..., d) -> (..., d)."""

    Options = NormOptions

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__(d_model, eps=eps)


@NORMS.register("groupnorm")
class GroupNorm1(nn.Module):
    """GroupNorm with one group: each sample (b, n, d) normalised over all its tokens and channels, then a
    per-channel affine (PoolFormer's norm on (b, d, h, w) images, on their tokens)."""

    Options = NormOptions
    mixes_tokens = True  # statistics over the whole sequence: refused in causal models

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(d_model)), nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, d)."""
        mean = x.mean((-2, -1), keepdim=True)
        var = x.var((-2, -1), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.to(x.dtype) + self.bias.to(x.dtype)
