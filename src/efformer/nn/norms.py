"""Normalisation layers: LayerNorm ("Layer Normalization", Ba et al.) and RMSNorm
("Root Mean Square Layer Normalization", Zhang & Sennrich)."""

from __future__ import annotations

import pydantic
from torch import nn

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
