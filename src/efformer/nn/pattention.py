"""Pattention: a linear layer replaced by attention from input tokens to learned parameter tokens.

Paper: "TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters" (Wang et al., 2024).

``Pattention(X) = Theta(X K_P^T) V_P`` with n key parameter tokens K_P (n, d_in) and value parameter
tokens V_P (n, d_out). Theta is the paper's modified softmax: each score row is L2-normalised and
scaled by tau, then passed through GeLU, ``Theta(S)_ij = GeLU(tau S_ij / ||S_i||_2)``, tau = sqrt(n).

Growth: appending parameter tokens with zero keys leaves every output unchanged,
because a zero key gives the score 0, which neither changes ||S_i|| nor passes GeLU (GeLU(0) = 0).
This holds exactly only if tau is kept at its value before growth (it is a stored buffer, not
recomputed from the new n) and not for a softmax Theta (exp(0) = 1 takes weight from the old
tokens); ``normalization="softmax"`` is offered as the comparison. The new values are drawn like the
initial ones, not zeroed: a zero key's gradient is GeLU'(0) tau / ||S_i|| (g . v_new) x, which a zero
value would silence for good, so the new tokens would never learn.

Also registered as the ``pattention`` feed-forward block, TokenFormer's FFN: one Pattention layer
with ``mult * d_model`` parameter tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.options import StrictModel
from efformer.registry import FFNS

Normalization = Literal["l2_gelu", "softmax"]


class Pattention(nn.Module):
    """Token-parameter attention: (..., d_in) -> (..., d_out) through n key/value parameter tokens."""

    def __init__(self, d_in: int, d_out: int, n_tokens: int, normalization: Normalization = "l2_gelu",
                 scale: float | None = None, init_std: float = 0.02):
        super().__init__()
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
            raise ConfigError("n_param_tokens", n_tokens, "a positive integer")
        if normalization not in ("l2_gelu", "softmax"):
            raise ConfigError("normalization", normalization, "'l2_gelu' (the paper) or 'softmax'")
        self.normalization, self.init_std = normalization, init_std
        self.keys = nn.Parameter(torch.randn(n_tokens, d_in) * init_std)
        self.values = nn.Parameter(torch.randn(n_tokens, d_out) * init_std)
        # tau is stored, so growth keeps it (a checkpoint keeps it too).
        self.register_buffer("scale", torch.tensor(math.sqrt(n_tokens) if scale is None else float(scale)))

    @property
    def n_tokens(self) -> int:
        """Number of key/value parameter tokens n."""
        return self.keys.shape[0]

    @property
    def weight(self) -> Tensor:
        """The value parameter tokens (n, d_out): the weights an init role (value, output) scales."""
        return self.values

    def scores(self, x: Tensor) -> Tensor:
        """Theta(x K_P^T) (..., n): the weight of every parameter token for every input token."""
        s = x @ self.keys.to(x.dtype).T
        if self.normalization == "softmax":
            return s.softmax(-1)
        norm = s.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)  # a zero input gives 0
        return F.gelu(s * (self.scale.to(s.dtype) / norm))

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out)."""
        return self.scores(x) @ self.values.to(x.dtype)

    @torch.no_grad()
    def grow(self, n_new: int) -> None:
        """Append ``n_new`` parameter tokens with zero keys and freshly drawn values, in place (outputs unchanged).

        The parameters are replaced by longer ones: build the optimizer again afterwards. To rebuild
        a grown layer from a config, give it the new token count and the old ``scale``.
        """
        if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new <= 0:
            raise ConfigError("n_new", n_new, "a positive number of parameter tokens to add")
        k, v = self.keys, self.values
        new_v = torch.randn(n_new, v.shape[1], device=v.device, dtype=v.dtype) * self.init_std
        self.keys = nn.Parameter(torch.cat([k, k.new_zeros(n_new, k.shape[1])]), requires_grad=k.requires_grad)
        self.values = nn.Parameter(torch.cat([v, new_v]), requires_grad=v.requires_grad)


class PattentionFFNOptions(StrictModel):
    """TokenFormer's FFN takes its width from the model config (``mult * d_model`` parameter tokens)."""


@FFNS.register("pattention")
class PattentionFFN(nn.Module):
    """TokenFormer FFN: one Pattention layer (b, n, d) -> (b, n, d) with ``mult * d`` parameter tokens."""

    Options = PattentionFFNOptions

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.layer = Pattention(d_model, d_model, max(1, round(mult * d_model)))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, d), dropout on the parameter-token weights."""
        return self.drop(self.layer.scores(x)) @ self.layer.values.to(x.dtype)
