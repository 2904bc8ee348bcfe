"""Exact softmax attention (multi-head, grouped-query, multi-query) with a KV-cache decode state.

Papers: "Attention Is All You Need" (Vaswani et al., 2017); grouped-query attention from
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
(Ainslie et al., 2023); multi-query from "Fast Transformer Decoding: One Write-Head is All
You Need" (Shazeer, 2019); QK-norm from "Scaling Vision Transformers to 22 Billion Parameters".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, MixerState, causal_keep
from efformer.nn.positional import PositionalContext
from efformer.registry import register_mixer


@dataclass
class KVState(MixerState):
    """KV cache: keys/values (batch, kv_heads, t, head_dim), their positions and keep-mask (batch, t)."""

    k: Tensor
    v: Tensor
    positions: Tensor
    keep: Tensor

    def append(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor) -> KVState:
        """Append new keys/values along the time axis, in place."""
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.keep = torch.cat([self.keep, keep], dim=1)
        return self


class SoftmaxOptions(MixerOptions):
    """Options of exact attention."""

    n_kv_heads: int | None = pydantic.Field(
        None,
        description="grouped-query attention; 1 = multi-query; None = n_heads",
    )
    qk_norm: bool = pydantic.Field(False, description="RMS-normalise q and k per head before the dot product")
    qkv_bias: bool = pydantic.Field(False, description="biases on the q/k/v/out projections")


def attention_keep(
    q_keep: Tensor | None, k_keep: Tensor | None, n_q: int, n_k: int, causal: bool, device
) -> Tensor | None:
    """Bool (batch|1, 1, n_q, n_k) of allowed query->key pairs, or None when all are allowed.

    Padded queries may see every key so that no row is empty (their outputs are zeroed later);
    real queries never see padded keys.
    """
    allowed = None
    if k_keep is not None:
        allowed = k_keep[:, None, None, :]
        if q_keep is not None:
            allowed = allowed | ~q_keep[:, None, :, None]
    if causal:
        c = causal_keep(n_q, n_k, device)[None, None]
        allowed = c if allowed is None else allowed & c
    return allowed


@register_mixer("softmax")
class SoftmaxAttention(Mixer):
    """Exact scaled dot-product attention: softmax(QK^T/sqrt(d) + bias) V, O(N^2) time."""

    capabilities = Capabilities(
        family="softmax",
        paper="Attention Is All You Need",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=True,
        time="O(N^2 d)",
        memory="O(N d) fused (SDPA), O(N^2) reference",
        forms=("reference", "fast"),
        attention_bias=True,
        rotary=True,
    )
    Options = SoftmaxOptions
    test_options = {"n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        kv = n_heads if self.opts.n_kv_heads is None else self.opts.n_kv_heads  # 0 is refused, not MHA
        if kv <= 0 or n_heads % kv:
            raise ConfigError(f"{self.name}.n_kv_heads", kv, f"must be positive and divide n_heads={n_heads}")
        self.n_kv_heads = kv
        hd, bias = self.head_dim, self.opts.qkv_bias
        self.q_proj = nn.Linear(d_model, n_heads * hd, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * kv * hd, bias=bias)
        self.out_proj = nn.Linear(n_heads * hd, d_model, bias=bias)
        if self.opts.qk_norm:
            self.q_norm = nn.RMSNorm(hd)
            self.k_norm = nn.RMSNorm(hd)

    def init_state(self, batch, device, dtype) -> KVState:
        """An empty KV cache."""
        kv, hd = self.n_kv_heads, self.head_dim
        return KVState(
            k=torch.zeros(batch, kv, 0, hd, device=device, dtype=dtype),
            v=torch.zeros(batch, kv, 0, hd, device=device, dtype=dtype),
            positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
            keep=torch.zeros(batch, 0, dtype=torch.bool, device=device),
        )

    # ---- shared parts of both forms -------------------------------------------------------
    def _qkv(self, x: Tensor, pos: PositionalContext) -> tuple[Tensor, Tensor, Tensor]:
        """q (b, h, n, d) and k, v (b, kv, n, d) of the new tokens: projected, QK-normed, rotated."""
        q = self.split_heads(self.q_proj(x))
        k, v = self.split_heads(self.kv_proj(x), 2 * self.n_kv_heads).chunk(2, dim=1)
        if self.opts.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return pos.rotate_queries(q), pos.rotate_keys(k), v

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused k|v projection, and the output projection."""
        return {"value": [self.kv_proj.weight[self.n_kv_heads * self.head_dim :]], "output": [self.out_proj.weight]}

    def _project(self, x, mask, state, pos):
        """q (b, h, n, d); k, v (b, kv, t, d) with the cache; allowed pairs (or None); the score bias;
        whether the call is a plain causal square (no padding, no cache offset), which needs no mask."""
        b, n, _ = x.shape
        positions = pos.positions
        q, k, v = self._qkv(x, pos)
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        k_pos, k_keep = positions, keep
        if state is not None:
            state.append(k, v, positions, keep)
            k, v, k_pos, k_keep = state.k, state.v, state.positions, state.keep
        has_pad = mask is not None or (state is not None and not bool(k_keep.all()))
        # A plain causal square needs no mask at all in the fast form (is_causal), so none is built here.
        plain_causal = self.causal and not has_pad and n == k.shape[2]
        allowed = None
        if has_pad or (self.causal and not plain_causal):
            allowed = attention_keep(
                keep if has_pad else None, k_keep if has_pad else None, n, k.shape[2], self.causal, x.device
            )
        bias = pos.score_bias(positions, k_pos)
        return q, k, v, allowed, bias, plain_causal

    def _finish(self, o: Tensor) -> Tensor:
        return self.out_proj(self.merge_heads(o))

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Explicit QK^T, bias, mask, softmax, dropout, times V."""
        q, k, v, allowed, bias, plain_causal = self._project(x, mask, state, pos)
        if plain_causal:
            allowed = causal_keep(q.shape[2], k.shape[2], x.device)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (b, h, n, t)
        if bias is not None:
            scores = scores + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = scores.softmax(dim=-1)
        p = F.dropout(p, self.dropout, self.training)
        return self._finish(p @ v), state

    def forward_fast(self, x, *, mask, state, pos):
        """``scaled_dot_product_attention``: FlashAttention on GPUs, a fused kernel on CPUs."""
        q, k, v, allowed, bias, plain_causal = self._project(x, mask, state, pos)
        is_causal = plain_causal and bias is None
        if plain_causal and bias is not None:
            allowed = causal_keep(q.shape[2], k.shape[2], x.device)
        attn_mask = allowed
        if bias is not None:
            attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self._finish(o), state
