"""Synthesizer: attention weights synthesised without query-key dot products.

Paper: "Synthesizer: Rethinking Self-Attention in Transformer Models" (Tay, Bahri, Metzler, Juan,
Zhao, Zheng, 2021).

- ``synthesizer_dense``: each token predicts its own row of logits over key positions with a
  two-layer MLP, B_i = W2 relu(W1 x_i + b1) + b2, (max_len logits per head). Factorised: the token
  predicts a (a) and c (max_len / a) and the logit of key position p is a[p // len(c)] * c[p % len(c)].
- ``synthesizer_random``: a logits matrix R (heads, max_len, max_len), learned or fixed at its random
  draw, shared by every input. Factorised: R = R1 R2^T with R1, R2 (heads, max_len, rank).

Then Y = softmax(logits + mask) V. Logits are indexed by absolute positions, so decoding keeps only
values (the logits of a new query never depend on keys). Both forms are O(N^2) by definition: the
fast form hands the logits to fused scaled-dot-product attention as an additive mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, MixerState
from efformer.mixers.softmax import attention_keep
from efformer.registry import register_mixer


@dataclass
class ValueState(MixerState):
    """Decode cache of values (batch, heads, t, head_dim), their positions and keep-mask (batch, t)."""

    v: Tensor
    positions: Tensor
    keep: Tensor


class DenseOptions(MixerOptions):
    """Options of the dense Synthesizer."""

    factorized: int | None = Field(
        None, ge=1,
        description="size a of the first factor (must divide max_len); None = full",
    )


class RandomOptions(MixerOptions):
    """Options of the random Synthesizer."""

    factorized: int | None = Field(
        None, ge=1,
        description="rank k of R = R1 R2^T (at most max_len); None = full matrix",
    )
    trainable: bool = Field(True, description="False keeps the random draw fixed (a buffer, saved with the model)")


def _capabilities(kind: str) -> Capabilities:
    return Capabilities(
        family="synthetic",
        paper="Synthesizer: Rethinking Self-Attention in Transformer Models",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N^2 d)",
        memory=f"O(N^2) (the {kind} logits are materialised by definition)",
        forms=("reference", "fast"),
    )


class _Synthesizer(Mixer):
    """Shared body: values, masks, positions, decode cache; subclasses give the logits."""

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The value projection and the output projection."""
        return {"value": [self.v_proj.weight], "output": [self.out_proj.weight]}

    def logits(self, x: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Synthetic logits (batch, heads, n, t) for queries x (batch, n, d) at q_pos against k_pos."""
        raise NotImplementedError

    def init_state(self, batch, device, dtype) -> ValueState:
        """An empty value cache."""
        return ValueState(
            v=torch.zeros(batch, self.n_heads, 0, self.head_dim, device=device, dtype=dtype),
            positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
            keep=torch.zeros(batch, 0, dtype=torch.bool, device=device),
        )

    def _prepare(self, x, mask, state, pos):
        """Masked logits (b, h, n, t) (-inf where not allowed) and values (b, h, t, d) including the cache."""
        b, n, _ = x.shape
        positions = pos.positions
        if n > self.max_len or int(positions.max()) >= self.max_len:
            raise ShapeError(
                f"{self.name}: sequence of {n} tokens at positions up to {int(positions.max())} does not fit "
                f"max_len={self.max_len} (logits exist for positions 0..{self.max_len - 1}); "
                "raise the model's max_len or use shorter inputs"
            )
        v = self.split_heads(self.v_proj(x))
        keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        k_pos, k_keep = positions, keep
        if state is not None:
            state.v = torch.cat([state.v, v], dim=2)
            state.positions = torch.cat([state.positions, positions], dim=1)
            state.keep = torch.cat([state.keep, keep], dim=1)
            v, k_pos, k_keep = state.v, state.positions, state.keep
        logits = self.logits(x, positions, k_pos)
        allowed = attention_keep(keep, k_keep, n, v.shape[2], self.causal, x.device)
        return logits.masked_fill(~allowed, float("-inf")), v

    def forward_reference(self, x, *, mask, state, pos):
        """softmax(masked synthetic logits) V, written out."""
        logits, v = self._prepare(x, mask, state, pos)
        p = F.dropout(logits.softmax(dim=-1), self.dropout, self.training)
        return self.out_proj(self.merge_heads(p @ v)), state

    def forward_fast(self, x, *, mask, state, pos):
        """Fused SDPA: width-1 zero q/k make every dot product 0, so its additive mask (the logits) is the score."""
        logits, v = self._prepare(x, mask, state, pos)
        b, h, n, t = logits.shape
        zeros_q, zeros_k = v.new_zeros(b, h, n, 1), v.new_zeros(b, h, t, 1)
        o = F.scaled_dot_product_attention(
            zeros_q, zeros_k, v, attn_mask=logits, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(self.merge_heads(o)), state


@register_mixer("synthesizer_dense")
class DenseSynthesizer(_Synthesizer):
    """Dense Synthesizer: each token's MLP predicts its logits over key positions (b, h, n, t)."""

    capabilities = _capabilities("dense")
    Options = DenseOptions
    test_max_len = 32

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        a = self.opts.factorized
        if a is not None and self.max_len % a:
            raise ConfigError(
                "synthesizer_dense.factorized", a, f"must divide max_len={self.max_len} (a * b = max_len)"
            )
        self.widths = (self.max_len,) if a is None else (a, self.max_len // a)
        self.hidden = nn.Linear(d_model, d_model)
        self.heads_out = nn.Linear(d_model, n_heads * sum(self.widths))

    def logits(self, x, q_pos, k_pos):
        """B = W2 relu(W1 x) per head, read at the key positions (factorised: a[p // |c|] * c[p % |c|])."""
        b, n, _ = x.shape
        t = k_pos.shape[1]
        out = self.heads_out(F.relu(self.hidden(x))).view(b, n, self.n_heads, -1).transpose(1, 2)
        parts = out.split(self.widths, dim=-1)

        def at(table: Tensor, idx: Tensor) -> Tensor:
            return table.gather(-1, idx[:, None, None, :].expand(b, self.n_heads, n, t))

        if len(parts) == 1:
            return at(parts[0], k_pos)
        width_c = self.widths[1]
        return at(parts[0], k_pos // width_c) * at(parts[1], k_pos % width_c)


@register_mixer("synthesizer_random")
class RandomSynthesizer(_Synthesizer):
    """Random Synthesizer: one (learned or fixed) logits matrix per head, read at (query, key) positions."""

    capabilities = _capabilities("random")
    Options = RandomOptions
    test_options = {"factorized": 4}
    test_max_len = 32

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        k, n_max = self.opts.factorized, self.max_len
        if k is not None and k > n_max:
            raise ConfigError("synthesizer_random.factorized", k, f"a rank must be at most max_len={n_max}")
        shapes = [(n_heads, n_max, n_max)] if k is None else [(n_heads, n_max, k), (n_heads, n_max, k)]
        # Scaled so that full and factorised logits start with unit variance.
        tables = [torch.randn(s) / (1.0 if k is None else k**0.25) for s in shapes]
        for i, table in enumerate(tables):
            if self.opts.trainable:
                self.register_parameter(f"table{i}", nn.Parameter(table))
            else:
                self.register_buffer(f"table{i}", table)

    def matrix(self) -> Tensor:
        """The full logits matrix R (heads, max_len, max_len)."""
        if self.opts.factorized is None:
            return self.table0
        return self.table0 @ self.table1.transpose(-1, -2)

    def logits(self, x, q_pos, k_pos):
        """R[h, q_pos, k_pos] per batch row: (b, h, n, t), without forming R when factorised."""
        if self.opts.factorized is None:
            return self.table0[:, q_pos[:, :, None], k_pos[:, None, :]].transpose(0, 1)
        r1 = self.table0[:, q_pos].transpose(0, 1)  # (b, h, n, k)
        r2 = self.table1[:, k_pos].transpose(0, 1)  # (b, h, t, k)
        return r1 @ r2.transpose(-1, -2)
