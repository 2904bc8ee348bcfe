"""Exact softmax attention (multi-head, grouped-query, multi-query) with a KV-cache decode state.

Papers: "Attention Is All You Need" (Vaswani et al., 2017); grouped-query attention from
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
(Ainslie et al., 2023); multi-query from "Fast Transformer Decoding: One Write-Head is All
You Need" (Shazeer, 2019); QK-norm from "Scaling Vision Transformers to 22 Billion Parameters".
Outlier-free variants (options ``normalizer`` and ``gated``): clipped softmax and gated attention from
"Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing" (Bondarenko et al.,
2023), and softmax_1 = exp(s_i) / (1 + sum_j exp(s_j)) from "Attention Is Off By One" (Miller, 2023),
which lets a head attend to nothing. The defaults keep plain softmax exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.kernels.split_kv import split_kv_attention
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, MixerState, causal_keep
from efformer.nn.positional import PositionalContext
from efformer.registry import register_mixer

SPLIT_KV_CHUNK = 1024  # keys per split of a split-KV decode step


@dataclass(kw_only=True)
class KVState(MixerState):
    """KV cache: keys/values (batch, kv_heads, t, head_dim), their positions and keep-mask (batch, t).

    The tensors live in buffers of some capacity >= t along the time axis, written in place and
    doubled when full, so a decode step copies one token's keys rather than the whole cache;
    ``k``, ``v``, ``positions``, ``keep`` are views of the first t entries. When autograd records the
    step (grad enabled and a tensor requiring grad), writing in place would change tensors saved for
    backward, so the buffers are concatenated instead and hold exactly t entries.
    """

    k_buf: Tensor
    v_buf: Tensor
    pos_buf: Tensor
    keep_buf: Tensor
    length: int = 0
    padded: bool = False  # some cached key is padding (keep False), so attention needs a mask
    time_dims: ClassVar[dict[str, int]] = {"k_buf": 2, "v_buf": 2, "pos_buf": 1, "keep_buf": 1}

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, device, dtype, **more: Tensor) -> KVState:
        """A cache holding no token (capacity 0; the first append sizes it)."""
        return cls(
            k_buf=torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype),
            v_buf=torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype),
            pos_buf=torch.zeros(batch, 0, dtype=torch.long, device=device),
            keep_buf=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            **more,
        )

    @property
    def k(self) -> Tensor:
        """Cached keys (batch, kv_heads, t, head_dim)."""
        return self.k_buf[:, :, : self.length]

    @property
    def v(self) -> Tensor:
        """Cached values (batch, kv_heads, t, head_dim)."""
        return self.v_buf[:, :, : self.length]

    @property
    def positions(self) -> Tensor:
        """Absolute positions of the cached keys (batch, t)."""
        return self.pos_buf[:, : self.length]

    @property
    def keep(self) -> Tensor:
        """Keep-mask of the cached keys (batch, t): False where the key is padding."""
        return self.keep_buf[:, : self.length]

    def batch_size(self) -> int:
        """Rows the cache holds (the key buffer's first dim; checked on every decode step, so no field scan)."""
        return self.k_buf.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before they must grow."""
        return self.k_buf.shape[2]

    def append(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None = None, *,
               graph: bool | None = None) -> KVState:
        """Append keys/values (batch, kv_heads, n, d) with positions and keep-mask (batch, n), in place.

        ``keep=None`` means every new token is kept (no mask tensor, no device sync); ``graph`` says
        autograd records this step (default: grad enabled and k or v requires grad), which forbids
        in-place writes.
        """
        if keep is not None and not self.padded:
            self.padded = not bool(keep.all())
        if graph is None:
            graph = needs_graph(k, v)
        self._write({"k_buf": k, "v_buf": v, "pos_buf": positions, "keep_buf": keep}, graph)
        return self

    def _write(self, new: dict[str, Tensor | None], graph: bool) -> None:
        """Append ``new`` (buffer name -> n entries on that buffer's time dim; None = all True) to every buffer."""
        t, n = self.length, new["k_buf"].shape[2]
        graph = graph or any(getattr(self, name).requires_grad for name in new)
        if graph:  # exactly t + n entries, so a later in-place step must grow (never overwrite saved tensors)
            for name, x in new.items():
                buf, d = getattr(self, name), self.time_dims[name]
                if x is None:
                    shape = list(buf.shape)
                    shape[d] = n
                    x = buf.new_ones(shape)
                setattr(self, name, torch.cat([buf.narrow(d, 0, t), x.to(buf.dtype)], d))
        else:
            if t + n > self.capacity:
                self._grow(max(t + n, 2 * self.capacity, 16))
            for name, x in new.items():
                dst = getattr(self, name).narrow(self.time_dims[name], t, n)
                dst.fill_(True) if x is None else dst.copy_(x)
        self.length = t + n

    def _grow(self, capacity: int) -> None:
        """Move the cached entries into new buffers of ``capacity`` along the time axis."""
        for name, d in self.time_dims.items():
            old = getattr(self, name)
            shape = list(old.shape)
            shape[d] = capacity
            buf = old.new_empty(shape)
            buf.narrow(d, 0, self.length).copy_(old.narrow(d, 0, self.length))
            setattr(self, name, buf)

    def select(self, index: Tensor) -> KVState:
        """The cache of the batch rows in ``index``; padding is re-checked, since those rows may hold none."""
        new = super().select(index)
        new.padded = self.padded and not bool(new.keep.all())
        return new


def needs_graph(*tensors: Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (grad enabled and one requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class SoftmaxOptions(MixerOptions):
    """Options of exact attention."""

    n_kv_heads: int | None = pydantic.Field(
        None,
        description="grouped-query attention; 1 = multi-query; None = n_heads",
    )
    qk_norm: bool = pydantic.Field(False, description="RMS-normalise q and k per head before the dot product")
    qkv_bias: bool = pydantic.Field(False, description="biases on the q/k/v/out projections")
    split_kv_from: int | None = pydantic.Field(
        None, ge=1,
        description="fast form: a one-token decode step against >= this many cached keys runs split-KV "
        "(flash-decoding, 1024-key chunks merged by log-sum-exp); None = never (on CPU it measured slower "
        "than SDPA up to 64K keys: benchmarks/split_kv_decode.py)",
    )

    out_bias: bool | None = pydantic.Field(None, description="bias on the out projection (None: as qkv_bias)")
    head_dim: int | None = pydantic.Field(None, gt=0, description="width of each head (None: d_model // n_heads)")


class OutlierFreeOptions(SoftmaxOptions):
    """Options of exact attention, plus the outlier-free normalizers and gate (plain softmax by default)."""

    normalizer: Literal["softmax", "softmax1", "clipped"] = pydantic.Field(
        "softmax", description="softmax; softmax1 (+1 in the denominator); clipped: clip((zeta-gamma)p+gamma, 0, 1)")
    clip_zeta: float = pydantic.Field(1.0, ge=1.0, description="clipped softmax stretch zeta (>= 1)")
    clip_gamma: float = pydantic.Field(0.0, le=0.0, description="clipped softmax stretch gamma (<= 0)")
    gated: bool = pydantic.Field(False, description="gated attention: each head's output times sigmoid(Linear(x))")


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
        packing=True,
    )
    Options = OutlierFreeOptions
    test_options = {"n_kv_heads": 2}
    # A callable p -> p_hat applied to the attention weights after normalisation, installed by
    # efformer.compress (FQ-ViT's log2 quantizer of post-softmax probabilities); the explicit form then runs.
    prob_quantizer = None
    head_dim_from_options = True

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        kv = n_heads if self.opts.n_kv_heads is None else self.opts.n_kv_heads  # 0 is refused, not MHA
        if kv <= 0 or n_heads % kv:
            raise ConfigError(f"{self.name}.n_kv_heads", kv, f"must be positive and divide n_heads={n_heads}")
        self.n_kv_heads = kv
        if self.opts.head_dim is not None:
            self.head_dim = self.opts.head_dim
        hd, bias = self.head_dim, self.opts.qkv_bias
        out_bias = bias if self.opts.out_bias is None else self.opts.out_bias
        self.q_proj = nn.Linear(d_model, n_heads * hd, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * kv * hd, bias=bias)
        self.out_proj = nn.Linear(n_heads * hd, d_model, bias=out_bias)
        if self.opts.qk_norm:
            self.q_norm = nn.RMSNorm(hd)
            self.k_norm = nn.RMSNorm(hd)
        if getattr(self.opts, "gated", False):  # subclasses with plain SoftmaxOptions have no gate
            self.gate = nn.Linear(d_model, n_heads)

    def init_state(self, batch, device, dtype) -> KVState:
        """An empty KV cache."""
        return KVState.empty(batch, self.n_kv_heads, self.head_dim, device, dtype)

    # ---- shared parts of both forms -------------------------------------------------------
    def _qkv(self, x: Tensor, pos: PositionalContext) -> tuple[Tensor, Tensor, Tensor]:
        """q (b, h, n, d) and k, v (b, kv, n, d) of the new tokens: projected, QK-normed, rotated."""
        q, k, v = self._qkv_unrotated(x)
        return pos.rotate_queries(q), pos.rotate_keys(k), v

    def _qkv_unrotated(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (b, h, n, d) and k, v (b, kv, n, d): projected and QK-normed, not yet rotated."""
        q = self.split_heads(self.q_proj(x))
        k, v = self.split_heads(self.kv_proj(x), 2 * self.n_kv_heads).chunk(2, dim=1)
        if self.opts.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def qkv_heads(self, x: Tensor, pos: PositionalContext) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (b, h, n, d) of the new tokens, key/value heads repeated for the query heads they serve (GQA)."""
        q, k, v = self._qkv(x, pos)
        g = self.n_heads // self.n_kv_heads
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return q, k, v

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused k|v projection, and the output projection."""
        return {"value": [self.kv_proj.weight[self.n_kv_heads * self.head_dim :]], "output": [self.out_proj.weight]}

    def _project(self, x, mask, state, pos):
        """q (b, h, n, d); k, v (b, kv, t, d) with the cache; allowed pairs (or None); the score bias;
        whether the call is a plain causal square (no padding, no cache offset), which needs no mask."""
        b, n, _ = x.shape
        if getattr(state, "in_cache_positions", False):
            return self._project_streaming(x, mask, state, pos)
        positions = pos.positions
        q, k, v = self._qkv(x, pos)
        if self.record_qk:  # efformer.reduce reads this layer's queries and keys between blocks
            self.last_qk = (q, k)
        if state is not None:
            # q too: SDPA saves the cached keys for q's gradient, so in-place writes need q free of grad
            state.append(k, v, positions, mask, graph=needs_graph(q, k, v))
            k, v, k_pos = state.k, state.v, state.positions
            has_pad = mask is not None or state.padded
            k_keep = state.keep if has_pad else None
        else:
            k_pos, has_pad, k_keep = positions, mask is not None, mask
        keep = mask if mask is not None or not has_pad else torch.ones(b, n, dtype=torch.bool, device=x.device)
        t = k.shape[2]
        # A plain causal square needs no mask at all in the fast form (is_causal), and a single query
        # after the cache may see every cached key, so neither builds one.
        seg = pos.segments  # packed rows: block-diagonal (causal) segments (no cache: refused by the base)
        plain_causal = self.causal and not has_pad and n == t and seg is None
        allowed = None
        if has_pad or (self.causal and not plain_causal and n > 1):
            allowed = attention_keep(keep, k_keep, n, t, self.causal, x.device)
        if seg is not None:
            same = (seg[:, :, None] == seg[:, None, :])[:, None]
            allowed = same if allowed is None else allowed & same
        bias = pos.score_bias(positions, k_pos)
        return q, k, v, allowed, bias, plain_causal

    def _project_streaming(self, x, mask, state, pos):
        """:meth:`_project` for a sinks + window cache (kv_policies.StreamingKVState): the kept keys are
        rotated (or biased) at their positions within the cache, the new queries at the ones after."""
        n = x.shape[1]
        q, k, v = self._qkv_unrotated(x)
        k, v, kept, k_pos = state.extend(k, v, mask)
        q_pos = k_pos[:, -n:]
        q, k = pos.at(q_pos).rotate_queries(q), pos.at(k_pos).rotate_keys(k)
        allowed = attention_keep(mask, kept, n, k.shape[2], self.causal, x.device)
        return q, k, v, allowed, pos.score_bias(q_pos, k_pos), False

    def _finish(self, o: Tensor, x: Tensor | None = None) -> Tensor:
        # gated attention: gates (b, n, h) -> (b, h, n, 1), so a head can switch its update off
        if x is not None and getattr(self.opts, "gated", False):
            o = o * torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]
        return self.out_proj(self.merge_heads(o))

    @property
    def normalizer(self) -> str:
        """The score normalizer: "softmax" for subclasses whose options have no outlier-free fields."""
        return getattr(self.opts, "normalizer", "softmax")

    def _normalize(self, scores: Tensor) -> Tensor:
        """Scores (b, h, n, t) with -inf where masked -> attention weights."""
        if self.normalizer == "softmax1":  # an extra logit 0 that no value is attached to
            m = scores.amax(-1, keepdim=True).clamp(min=0).detach()
            e = torch.exp(scores - m)
            return e / (torch.exp(-m) + e.sum(-1, keepdim=True))
        p = scores.softmax(dim=-1)
        if self.normalizer == "clipped":
            zeta, gamma = self.opts.clip_zeta, self.opts.clip_gamma
            p = ((zeta - gamma) * p + gamma).clamp(0, 1)
        return p

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
        p = self._normalize(scores)
        if self.prob_quantizer is not None:
            p = self.prob_quantizer(p)
        p = F.dropout(p, self.dropout, self.training)
        return self._finish(p @ v, x), state

    def forward_fast(self, x, *, mask, state, pos):
        """``scaled_dot_product_attention``: FlashAttention on GPUs, a fused kernel on CPUs."""
        if self.normalizer == "clipped" or self.prob_quantizer is not None:  # no fused kernel clips or
            # quantizes the weights: the explicit form is the fast one
            return self.forward_reference(x, mask=mask, state=state, pos=pos)
        q, k, v, allowed, bias, plain_causal = self._project(x, mask, state, pos)
        if self.normalizer == "softmax1":
            return self._finish(self._sdpa_softmax1(q, k, v, allowed, bias, plain_causal), x), state
        is_causal = plain_causal and bias is None
        if plain_causal and bias is not None:
            allowed = causal_keep(q.shape[2], k.shape[2], x.device)
        attn_mask = allowed
        if bias is not None:
            attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        split_from = self.opts.split_kv_from
        decode = state is not None and q.shape[2] == 1 and not (self.training and self.dropout)
        if decode and split_from is not None and k.shape[2] >= split_from:
            return self._finish(split_kv_attention(q, k, v, attn_mask, chunk_size=SPLIT_KV_CHUNK)), state
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self._finish(o, x), state

    def _sdpa_softmax1(self, q, k, v, allowed, bias, plain_causal) -> Tensor:
        """softmax_1 through SDPA: one extra key of zeros (score exactly 0) with a zero value, always allowed."""
        b, h, n, _ = q.shape
        t = k.shape[2]
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], 2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], 2)
        if plain_causal:
            allowed = causal_keep(n, t, q.device)[None, None]
        mask = torch.zeros(b, 1, n, t, device=q.device, dtype=q.dtype) if bias is None else \
            bias.to(q.dtype).expand(b, -1, n, t)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:3], 1)], -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.n_kv_heads != self.n_heads)
