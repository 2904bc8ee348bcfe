"""Multi-scale retention (RetNet).

Paper: "Retentive Network: A Successor to Transformer for Large Language Models" (Sun et al., 2023).
Retention is linear attention with a fixed exponential decay per head, gamma_h = 1 - 2^(-5 - h),
and q/k rotated by position (the xPos-derived theta rotation; its decaying scale is absorbed in
gamma). Parallel form: (Q K^T * D) V with D[n, m] = gamma^(n - m) for n >= m; recurrent form:
S_n = gamma S_{n-1} + k_n^T v_n. Heads are group-normed and passed through a swish gate.

The scalar gate makes retention the special case of gated linear attention with one log-gate
per head broadcast over the key dims, so its forms share :class:`GatedLinearMixer`.
"""

from __future__ import annotations

import math

import pydantic
import torch

from efformer.errors import ConfigError
from efformer.mixers.base import causal_recurrent
from efformer.mixers.gla import GatedLinearMixer, GatedLinearOptions
from efformer.nn.positional import Rope
from efformer.registry import register_mixer


class RetentionOptions(GatedLinearOptions):
    """Options of multi-scale retention."""

    rotate: bool = pydantic.Field(
        True,
        description="built-in theta rotation of q/k (a model-level rotary scheme replaces it)",
    )
    rotary_base: float = pydantic.Field(10000.0, gt=1, description="base of the rotation frequencies")
    expand_v: float = pydantic.Field(1.0, gt=0, description="value dim = expand_v * d_model (the paper uses 2)")


def retention_log_decays(n_heads: int) -> torch.Tensor:
    """log gamma_h for h = 0..n_heads-1, gamma_h = 1 - 2^(-5 - h): the multi-scale decays (heads,)."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64)))).float()


@register_mixer("retnet")
class MultiScaleRetention(GatedLinearMixer):
    """Multi-scale retention: per-head fixed decay gamma_h, rotated q/k, group norm and swish gate."""

    capabilities = causal_recurrent(
        paper="Retentive Network: A Successor to Transformer for Large Language Models",
        time="O(N C d + N d^2) chunked, O(N d^2) recurrent, O(N^2 d) parallel",
        memory="O(N d + d^2) per head",
        forms=("reference", "chunked", "recurrent", "triton"),
        rotary=True,  # a scalar decay commutes with rotations, so the relative form is kept
        packing=True,  # a reset gate at each segment start (GatedLinearMixer)
    )
    Options = RetentionOptions
    test_options = {"chunk_size": 4, "sub_chunk_size": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        total_v = int(d_model * o.expand_v)
        if total_v <= 0 or total_v % n_heads:
            raise ConfigError(
                f"{self.name}.expand_v",
                o.expand_v,
                f"d_model*expand_v={total_v} must be a positive multiple of n_heads",
            )
        self._build(self.head_dim, total_v // n_heads)
        # Fixed, not learned: a buffer so it moves with the module and lands in checkpoints.
        self.register_buffer("log_decay", retention_log_decays(n_heads))
        self.theta = None
        if o.rotate and self.head_dim >= 2:
            self.theta = Rope(d_model, n_heads, 0, True, {"base": o.rotary_base})

    def _project(self, x, pos):
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        if pos.rotation is None and self.theta is not None:  # the built-in rotation, when the model has none
            pos = self.theta.context(pos.positions, q.dtype)
        q, k = pos.rotate_queries(q), pos.rotate_keys(k)
        b, n = x.shape[:2]
        g = self.log_decay.to(q.dtype)[None, :, None, None].expand(b, -1, n, 1)
        v = self.split_heads(self.v_proj(x))
        return q / math.sqrt(self.head_dim), k, v, g

    def decays(self) -> torch.Tensor:
        """gamma per head (heads,)."""
        return self.log_decay.exp()
