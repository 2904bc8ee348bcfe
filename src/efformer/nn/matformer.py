"""The nested FFN of "MatFormer: Nested Transformer for Elastic Inference" (Kudugunta et al., 2023):
a GLU whose first m_g hidden neurons form granularity g, so one set of weights holds every width.
Training sums the loss over granularities (``efformer.models.elastic``), or samples a random
sub-network per step as in "POA: Pre-training Once for Models of All Sizes"; ``extract`` keeps the
first neurons of each layer as a standalone smaller model (Mix'n'Match: a width per layer)."""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.nn.ffn import _ACTS
from efformer.options import StrictModel, validate_options
from efformer.registry import FFNS


class MatFormerOptions(StrictModel):
    """Options of the ``matformer`` FFN."""

    granularities: list[float] = pydantic.Field(
        [0.125, 0.25, 0.5, 1.0], min_length=1, description="Nested widths as fractions of the hidden width, "
        "ascending, the last 1.0 (the full FFN).")
    activation: Literal["silu", "gelu", "relu"] = pydantic.Field("silu", description="GLU activation.")
    training: Literal["joint", "random"] = pydantic.Field(
        "joint", description="joint: each step sums the loss of every granularity (the same in all layers); "
        "random (POA): the full model plus one random width per layer.")
    layer_widths: list[float] | None = pydantic.Field(
        None, description="Set by extract: each layer keeps only this granularity's neurons.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> MatFormerOptions:
        g = self.granularities
        if any(not 0 < w <= 1 for w in g) or g != sorted(set(g)) or g[-1] != 1.0:
            raise ValueError(f"granularities={g} must be distinct fractions in (0, 1], ascending, ending at 1.0")
        bad = [w for w in self.layer_widths or [] if w not in g]
        if bad:
            raise ValueError(f"layer_widths holds {bad[0]}, not one of the granularities {g}")
        return self


@FFNS.register("matformer")
class MatFormerFFN(nn.Module):
    """Nested GLU: (b, n, d) -> (b, n, d) using the first ``width`` hidden neurons (None: all it holds)."""

    Options = MatFormerOptions

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, *, options=None, causal: bool = False):
        super().__init__()
        self.opts = validate_options(MatFormerOptions, options, "ffn_options")
        self.full_hidden = max(1, round(2 * mult * d_model / 3))  # the GLU width, as swiglu
        sizes = [self.hidden_of(g) for g in self.opts.granularities]
        if len(set(sizes)) != len(sizes):
            raise ConfigError("ffn_options.granularities", self.opts.granularities,
                              f"distinct neuron counts of the hidden width {self.full_hidden} (got {sizes})")
        bound = d_model ** -0.5
        # (hidden, d) each: a granularity's weights are a contiguous row prefix of every matrix
        self.w_gate = nn.Parameter(torch.empty(self.full_hidden, d_model).uniform_(-bound, bound))
        self.w_up = nn.Parameter(torch.empty(self.full_hidden, d_model).uniform_(-bound, bound))
        self.w_down = nn.Parameter(torch.empty(self.full_hidden, d_model).uniform_(-bound, bound))
        self.act = _ACTS[self.opts.activation]
        self.drop = nn.Dropout(dropout)
        self.width: float | None = None

    def hidden_of(self, granularity: float) -> int:
        """Neurons of a granularity (a fraction of the full hidden width)."""
        return max(1, round(granularity * self.full_hidden))

    @property
    def held(self) -> int:
        """Neurons this module holds (fewer than the full width after extract)."""
        return self.w_gate.shape[0]

    def configure_layer(self, layer: int) -> None:
        """Keep only this layer's ``layer_widths`` neurons (an extracted model); called once when built."""
        if self.opts.layer_widths is None:
            return
        h = self.hidden_of(self.opts.layer_widths[layer])
        for name in ("w_gate", "w_up", "w_down"):
            setattr(self, name, nn.Parameter(getattr(self, name).data[:h].clone()))

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, d) at the active granularity."""
        h = self.held if self.width is None else self.hidden_of(self.width)
        if h > self.held:
            raise ConfigError("width", self.width, f"at most the {self.held} neurons this layer holds")
        gate, up = F.linear(x, self.w_gate[:h]), F.linear(x, self.w_up[:h])
        return self.drop(self.act(gate) * up) @ self.w_down[:h]
