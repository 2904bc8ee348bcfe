"""Sparse Sinkhorn attention: blocks attend to themselves and to a learned soft permutation of blocks.

Paper: "Sparse Sinkhorn Attention" (Tay, Bahri, Yang, Metzler, Juan, 2020).

The sequence is cut into blocks of ``block_size`` (right-padded to a whole block). A sorting network
(two-layer MLP on each block's sum of token embeddings) scores every block against every block, per
head: R (batch, heads, N_B, N_B). Sinkhorn balancing (``sinkhorn_iters`` alternating row and column
normalisations of exp(R / temperature), in log space) turns R into a soft permutation S, which is
doubly stochastic in the limit. Block i's queries then attend, in one softmax, to block i's own keys
and to the "sorted" block sum_j S_ij K_j (values sorted the same way).

Bidirectional only. The paper's causal variant (masked "causal Sinkhorn balancing") is not
implemented: column normalisation sums over all blocks, block embeddings pool a whole block, and the
sorted partner block mixes every token of the blocks it draws from, so defining it without any
future-to-past leak needs choices the paper leaves open; a causal LM is refused instead.

The sorting network outputs ``max_len / block_size`` scores per block and the first N_B are used,
so sequences longer than ``max_len`` are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, pad_to_multiple
from efformer.registry import register_mixer


class SinkhornOptions(MixerOptions):
    """Options of Sparse Sinkhorn attention."""

    block_size: int = Field(64, ge=1, description="tokens per block; each block sees its own and one sorted block")
    sinkhorn_iters: int = Field(8, ge=0, description="row+column normalisation rounds (0 = row softmax only)")
    temperature: float = Field(0.75, gt=0, description="lower = closer to a hard permutation")


def sinkhorn(log_r: Tensor, iters: int) -> Tensor:
    """Sinkhorn balancing in log space: (..., n, n) scores -> (..., n, n) near doubly-stochastic matrix.

    Ends on a row normalisation so rows always sum to one (each block's sorted partner is a convex mix).
    """
    for _ in range(iters):
        log_r = log_r - log_r.logsumexp(dim=-2, keepdim=True)
        log_r = log_r - log_r.logsumexp(dim=-1, keepdim=True)
    if iters == 0:
        log_r = log_r.log_softmax(dim=-1)
    return log_r.exp()


@register_mixer("sinkhorn")
class SinkhornAttention(Mixer):
    """Sparse Sinkhorn attention: local block attention plus attention to a soft-sorted partner block."""

    capabilities = Capabilities(
        family="sorting",
        paper="Sparse Sinkhorn Attention",
        causal=False,
        bidirectional=True,
        padding_mask=True,
        decode=False,
        exact=False,
        time="O(N b d + (N/b)^2 (b d + iters))",
        memory="O(N b + N d + (N/b)^2) fast, O(N^2) reference",
        forms=("reference", "fast"),
    )
    Options = SinkhornOptions
    test_options = {"block_size": 4, "sinkhorn_iters": 4}
    test_max_len = 32

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        bs, max_len = self.opts.block_size, self.max_len
        if max_len < bs:
            raise ConfigError("max_len", max_len, f"must be at least block_size={bs}")
        self.max_blocks = -(-max_len // bs)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # No output bias: a per-column constant is removed exactly by column normalisation.
        self.sort_net = nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, n_heads * self.max_blocks, bias=False)
        )

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused q|k|v projection, and the output projection."""
        return {"value": [self.qkv_proj.weight[2 * self.d_model :]], "output": [self.out_proj.weight]}

    def sort_matrix(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The soft block permutation S (batch, heads, N_B, N_B) of x (batch, seq, d_model)."""
        x, keep = self._pad(x, mask)
        b, n, _ = x.shape
        nb = n // self.opts.block_size
        pooled = (x * keep[..., None]).view(b, nb, self.opts.block_size, -1).sum(dim=2)  # only real tokens
        r = self.sort_net(pooled).view(b, nb, self.n_heads, self.max_blocks)[..., :nb].transpose(1, 2)
        return sinkhorn(r / self.opts.temperature, self.opts.sinkhorn_iters)

    # ---- shared parts ---------------------------------------------------------------------
    def _pad(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x right-padded to whole blocks (b, n_pad, d) and its keep-mask (b, n_pad)."""
        if x.shape[1] > self.max_len:
            raise ShapeError(
                f"sinkhorn: sequence length {x.shape[1]} exceeds max_len={self.max_len}; "
                "raise the model's max_len (the sorting network's width) or use shorter inputs"
            )
        keep = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        x, _ = pad_to_multiple(x, self.opts.block_size)
        keep, _ = pad_to_multiple(keep, self.opts.block_size, value=False)
        return x, keep

    def _project(self, x: Tensor, mask: Tensor | None):
        """q, k, v (b, h, n_pad, d) with padded keys/values zeroed, keep (b, n_pad), S (b, h, N_B, N_B)."""
        s = self.sort_matrix(x, mask)
        x, keep = self._pad(x, mask)
        q, k, v = self.split_heads(self.qkv_proj(x), 3 * self.n_heads).chunk(3, dim=1)
        zero = ~keep[:, None, :, None]
        # Zeroed padded keys/values carry no padded content into the sorted (mixed) blocks.
        return q / math.sqrt(self.head_dim), k.masked_fill(zero, 0.0), v.masked_fill(zero, 0.0), keep, s

    def _sorted_keep(self, keep: Tensor) -> Tensor:
        """(b, block_size): slot u of a sorted block holds real content iff some block has a real token at u."""
        return keep.view(keep.shape[0], -1, self.opts.block_size).any(dim=1)

    def _finish(self, o: Tensor, n: int) -> Tensor:
        return self.out_proj(self.merge_heads(o[:, :, :n]))

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Full N x N scores; sorted-block scores and weights as S-weighted sums over original tokens."""
        n, bs = x.shape[1], self.opts.block_size
        q, k, v, keep, s = self._project(x, mask)
        b, h, n_pad, _ = q.shape
        nb = n_pad // bs
        block = torch.arange(n_pad, device=x.device) // bs
        scores = q @ k.transpose(-1, -2)  # (b, h, n_pad, n_pad)
        local_ok = (block[:, None] == block[None, :]) & keep[:, None, None, :]
        s_q = s[:, :, block]  # (b, h, n_pad, N_B): each query's row of S
        # Score of query t against slot u of its sorted block: sum_j S[blk(t), j] * score(t, j*bs + u).
        sorted_scores = torch.einsum("bhqj,bhqju->bhqu", s_q, scores.view(b, h, n_pad, nb, bs))
        sorted_ok = self._sorted_keep(keep)[:, None, None, :].expand(b, 1, n_pad, bs)
        q_pad = ~keep[:, None, :, None]  # padded queries may see everything (outputs are dropped)
        logits = torch.cat(
            [
                scores.masked_fill(~(local_ok | q_pad), float("-inf")),
                sorted_scores.masked_fill(~(sorted_ok | q_pad), float("-inf")),
            ],
            dim=-1,
        )
        p = F.dropout(logits.softmax(dim=-1), self.dropout, self.training)
        p_local, p_sorted = p.split([n_pad, bs], dim=-1)
        # Weight on original token j*bs + u through the sorted block: p_sorted[t, u] * S[blk(t), j].
        through_sorted = (s_q[..., :, None] * p_sorted[..., None, :]).reshape(b, h, n_pad, n_pad)
        return self._finish((p_local + through_sorted) @ v, n), state

    def forward_fast(self, x, *, mask, state, pos):
        """Sort whole blocks of keys/values by S, then per-block attention over 2 blocks: no N x N."""
        n, bs = x.shape[1], self.opts.block_size
        q, k, v, keep, s = self._project(x, mask)
        b, h, n_pad, d = q.shape
        nb = n_pad // bs
        qb, kb, vb = (t.view(b, h, nb, bs, d) for t in (q, k, v))
        k_sorted = torch.einsum("bhij,bhjud->bhiud", s, kb)
        v_sorted = torch.einsum("bhij,bhjud->bhiud", s, vb)
        scores = qb @ torch.cat([kb, k_sorted], dim=3).transpose(-1, -2)  # (b, h, N_B, bs, 2 bs)
        k_ok = torch.cat(
            [keep.view(b, 1, nb, 1, bs), self._sorted_keep(keep)[:, None, None, None, :].expand(b, 1, nb, 1, bs)],
            dim=-1,
        )
        ok = k_ok | ~keep.view(b, 1, nb, bs, 1)
        p = F.dropout(scores.masked_fill(~ok, float("-inf")).softmax(dim=-1), self.dropout, self.training)
        o = p @ torch.cat([vb, v_sorted], dim=3)
        return self._finish(o.view(b, h, n_pad, d), n), state
