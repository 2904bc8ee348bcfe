"""Key-Value attention: no query projection; queries are the keys, so the scores K K^T are symmetric.

Paper: "Key-Value Transformer" (Ali Borji, 2023).

``softmax(K K^T / sqrt(d)) V`` with K = X W_k, V = X W_v: a third fewer projection weights and FLOPs
than Q/K/V attention. Symmetric logits make the attention matrix P reversible: P_ij Z_i = P_ji Z_j
with Z_i the row normaliser. The paper's asymmetric variant adds a 2-D positional encoding to the
attention matrix; here it is a learned (max_len x max_len) table T shared by the heads, added as
``T[pos_i, pos_j]`` to the logits (our choice of parameterisation; zero at init, where it equals the
symmetric variant). Everything else (KV cache, forms, positional schemes, padding) is exact softmax
attention's, with the query of a token being its key.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.base import Capabilities
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.registry import register_mixer


class KVOptions(SoftmaxOptions):
    """Options of key-value attention (n_kv_heads must stay n_heads: every query head is a key head)."""

    variant: Literal["symmetric", "asymmetric"] = pydantic.Field(
        "symmetric",
        description="symmetric: logits K K^T; asymmetric: plus a learned (max_len x max_len) positional table",
    )


@register_mixer("kv_attention")
class KVAttention(SoftmaxAttention):
    """Key-Value Transformer attention: softmax(K K^T / sqrt(d) [+ T[pos_i, pos_j]]) V, O(N^2 d)."""

    capabilities = Capabilities(
        family="softmax",
        paper="Key-Value Transformer",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,  # exact softmax of another score (queries are keys), not of Q K^T
        time="O(N^2 d)",
        memory="O(N d) fused (SDPA) symmetric, O(N^2) with the asymmetric table, O(N^2) reference",
        forms=("reference", "fast"),
        attention_bias=True,
        rotary=True,
    )
    Options = KVOptions
    test_options = {"variant": "asymmetric"}
    test_max_len = 32

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        if self.n_kv_heads != n_heads:
            raise ConfigError(f"{self.name}.n_kv_heads", self.opts.n_kv_heads,
                              f"queries are the keys, so there must be n_heads={n_heads} key heads (leave it None)")
        del self.q_proj  # the point of the mechanism
        if self.opts.qk_norm:
            del self.q_norm
        if self.opts.variant == "asymmetric":
            self.pos_table = nn.Parameter(torch.zeros(self.max_len, self.max_len))

    def _qkv(self, x: Tensor, pos) -> tuple[Tensor, Tensor, Tensor]:
        """k and v (b, h, n, d) of the new tokens; the queries are the (normed, rotated) keys."""
        k, v = self.split_heads(self.kv_proj(x), 2 * self.n_heads).chunk(2, dim=1)
        if self.opts.qk_norm:
            k = self.k_norm(k)
        return pos.rotate_queries(k), pos.rotate_keys(k), v

    def _project(self, x, mask, state, pos):
        """As softmax attention's, plus the asymmetric table T[pos_i, pos_j] in the score bias."""
        q, k, v, allowed, bias, plain_causal = super()._project(x, mask, state, pos)
        if self.opts.variant == "asymmetric":
            q_pos = pos.positions
            k_pos = state.positions if state is not None else q_pos
            top = int(torch.maximum(q_pos.max(), k_pos.max()))
            if top >= self.max_len:
                raise ShapeError(f"kv_attention: position {top} >= max_len={self.max_len}, the size of the "
                                 "asymmetric positional table; raise the model's max_len")
            table = self.pos_table.to(q.dtype)[q_pos[:, :, None], k_pos[:, None, :]][:, None]  # (b, 1, n, t)
            bias = table if bias is None else bias + table
        return q, k, v, allowed, bias, plain_causal
