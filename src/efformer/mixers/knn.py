"""IceFormer: softmax attention over the top-k keys per query, found by approximate nearest-neighbour search.

Paper: "IceFormer: Accelerated Inference with Long-Sequence Transformers on CPUs" (Mao et al., 2024).

IceFormer is training-free: it takes a trained softmax model unchanged (this mixer has exactly the
weights of ``softmax``, so a checkpoint loads as is) and at inference attends each query to the k keys
with the largest scores, which it retrieves with a k-nearest-neighbour index instead of scoring all
N keys. Maximum inner product search becomes nearest-neighbour search by the usual lift:
k' = [k, sqrt(M^2 - |k|^2)], q' = [q M / |q|, 0] with M the largest key norm (of the index block), so |q' - k'|^2 =
2 M^2 - 2 M q.k / |q| ranks keys exactly as q.k does.

The index (our choice; the paper uses Prioritized DCI, whose data-dependent traversal does not
vectorise): L random projections of the lifted keys, each a sorted list per block of ``index_block``
keys. A query's candidates in a block are the ``probe`` keys on either side of its own projection in
each sorted list (a binary search, as in DCI's simple indices); the candidates of all projections are
pooled, scored exactly, and the top k kept. Bidirectional queries search every block; causal queries
search the blocks before their own and take their own block's keys j <= i directly, so no index ever
contains a later key and the pattern is causal. ``metric="cosine"`` searches by angle instead of the
lift (exact top-k still ranks by q.k): 1-D projections find near neighbours only when they are near,
and after the lift a query's best key is near it only if that key has the largest norm. With
probe >= index_block / 2 every key is a candidate, and with k = N the result is softmax attention exactly.

The reference form writes the candidate set densely from the ranks (query window vs key rank) and
takes a masked top-k of the full score matrix; the fast form gathers only candidates, one chunk of
queries at a time: O(N (C d + L log index_block)) time with C = L * 2 probe * blocks searched
(+ index_block when causal), O(chunk C d) memory.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities, pad_to_multiple
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.registry import register_mixer


class IceFormerOptions(SoftmaxOptions):
    """Options of IceFormer's top-k attention."""

    metric: Literal["inner_product", "cosine"] = pydantic.Field(
        "inner_product",
        description="search by q.k through the MIPS lift (the paper), or by angle (finds keys aligned with q better)",
    )
    top_k: int = pydantic.Field(32, ge=1, description="k: keys each query attends to (the k best-scoring candidates)")
    n_projections: int = pydantic.Field(4, ge=1, description="L: random projections, each a sorted index of the keys")
    probe: int = pydantic.Field(
        32, ge=1, description="candidates on each side of the query in every sorted projection of every block searched"
    )
    index_block: int = pydantic.Field(
        2048, ge=1, description="keys per index block (causal: a query searches earlier blocks, scans its own)"
    )
    query_chunk: int = pydantic.Field(
        512, ge=1, description="queries the fast form handles at once, bidirectional (causal: one index block)"
    )
    seed: int = pydantic.Field(
        0, ge=0, description="seed of the random projections (not saved, so the weights are softmax's)"
    )


def _softmax_rows(s: Tensor) -> Tensor:
    """softmax over the last dim; a row with no finite score gives zeros instead of NaN."""
    top = s.detach().amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(top), top, 0.0))
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


@register_mixer("iceformer")
class IceFormerAttention(SoftmaxAttention):
    """IceFormer: softmax attention over each query's top-k keys, retrieved by random-projection k-NN search."""

    capabilities = Capabilities(
        family="hashing",
        paper="IceFormer: Accelerated Inference with Long-Sequence Transformers on CPUs",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=False,  # the index is built per call (prefill / encoding, the paper's CPU use); models recompute
        exact=False,
        time="O(N (C d + L log B)), C = 2 L probe N/B (+ B causal)",
        memory="O(chunk C d) fast, O(N^2) reference",
        forms=("reference", "fast"),
        rotary=True,
    )
    Options = IceFormerOptions
    test_options = {"top_k": 3, "n_projections": 2, "probe": 1, "index_block": 4, "query_chunk": 5, "n_kv_heads": 2}
    reference_below = 256  # the dense form is faster than sorting and gathering for short sequences on CPU

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        if self.opts.top_k > self.max_len:
            raise ConfigError(f"{self.name}.top_k", self.opts.top_k,
                              f"must be at most max_len={self.max_len} (there are never more keys than that)")
        gen = torch.Generator().manual_seed(self.opts.seed)
        u = torch.randn(self.opts.n_projections, self.head_dim + 1, generator=gen)
        self.register_buffer("projections", u / u.norm(dim=-1, keepdim=True), persistent=False)

    # ---- the index ------------------------------------------------------------------------
    def _heads(self, x, mask, pos):
        """q, k, v (b, h, n, d) with GQA heads repeated, and the key keep-mask (b, n)."""
        q, k, v = self.qkv_heads(x, pos)
        keep = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return q, k, v, keep

    @torch.no_grad()
    def _index(self, q: Tensor, k: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """The index: per block of keys and projection, the sorted lifted-key projections and their ids within
        the block (b, h, L, blocks, B); the queries' projections lifted for every block (b, h, L, blocks, n).

        Each block is lifted with its own largest key norm M, so a block's index depends on its keys only.
        """
        b, h, n, d = k.shape
        bs = min(self.opts.index_block, n)
        k = pad_to_multiple(k, bs, dim=2)[0].unflatten(2, (-1, bs))  # (b, h, blocks, B, d)
        keep = pad_to_multiple(keep, bs, dim=1, value=False)[0].unflatten(1, (-1, bs))[:, None]  # (b, 1, blocks, B)
        if self.opts.metric == "cosine":  # unit keys, nothing lifted
            m2 = torch.ones_like(k[..., :1, 0])
            kx = torch.cat([F.normalize(k, dim=-1), torch.zeros_like(k[..., :1])], -1)
        else:
            kn2 = k.square().sum(-1)
            m2 = kn2.masked_fill(~keep, 0).amax(-1, keepdim=True)  # (b, h, blocks, 1)
            kx = torch.cat([k, (m2 - kn2).clamp_min(0).sqrt()[..., None]], -1)
        u = self.projections.to(q.dtype)
        pk = torch.einsum("bhcje,le->bhlcj", kx, u).masked_fill(~keep[:, :, None], float("inf"))
        unit = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
        pq = torch.einsum("bhnd,ld->bhln", unit, u[:, :d])[:, :, :, None] * m2.sqrt()[:, :, None]
        sorted_pk, order = pk.sort(-1)
        return sorted_pk, order, pq, bs

    @torch.no_grad()
    def _windows(self, pq: Tensor, sorted_pk: Tensor, bs: int) -> Tensor:
        """First rank (b, h, L, blocks, n) of each query's window of 2 probe keys in every block's sorted list."""
        where = torch.searchsorted(sorted_pk.contiguous(), pq.contiguous())
        width = min(2 * self.opts.probe, bs)
        return (where - self.opts.probe).clamp(0, bs - width)

    def _block_ok(self, q_idx: Tensor, blocks: int, bs: int) -> Tensor:
        """Bool (n, blocks): may query i search block c's index (causal: only earlier blocks)."""
        c = torch.arange(blocks, device=q_idx.device)
        if not self.causal:
            return torch.ones(q_idx.shape[0], blocks, dtype=torch.bool, device=q_idx.device)
        return c[None] < (q_idx // bs)[:, None]

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Candidates written densely (key rank inside a query's window, own block j <= i when causal), masked
        top-k of the full score matrix, softmax over the kept scores."""
        q, k, v, keep = self._heads(x, mask, pos)
        n = x.shape[1]
        sorted_pk, order, pq, bs = self._index(q, k, keep)
        start = self._windows(pq, sorted_pk, bs)  # (b, h, L, blocks, n)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(bs, device=x.device).expand_as(order))
        rank = rank.flatten(3)[..., :n]  # (b, h, L, n_keys): rank of each key in its block's sorted list
        j = torch.arange(n, device=x.device)
        i = j[:, None]
        blk = j // bs
        st = start[:, :, :, blk].transpose(-1, -2)  # (b, h, L, n_q, n_keys): the window start in key j's block
        inside = (rank[:, :, :, None, :] >= st) & (rank[:, :, :, None, :] < st + min(2 * self.opts.probe, bs))
        cand = inside.any(2) & self._block_ok(j, -(-n // bs), bs)[:, blk]
        if self.causal:
            cand = cand | ((blk[None] == blk[:, None]) & (j[None] <= i))
        cand = cand & keep[:, None, None, :]
        s = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~cand, float("-inf"))
        kk = min(self.opts.top_k, n)
        chosen = torch.zeros_like(cand).scatter_(-1, s.topk(kk, dim=-1).indices, True) & cand
        return self._finish(_softmax_rows(s.masked_fill(~chosen, float("-inf"))) @ v), state

    def forward_fast(self, x, *, mask, state, pos):
        """Per chunk of queries (causal: per index block): binary-search windows, candidate keys gathered as
        rows, exact scores (the own block by one matmul), top-k, softmax over the kept scores."""
        q, k, v, keep = self._heads(x, mask, pos)
        b, h, n, d = q.shape
        sorted_pk, order, pq, bs = self._index(q, k, keep)
        nb, width, dev = order.shape[3], min(2 * self.opts.probe, bs), x.device
        # Candidate ids by flat offsets into the index (rank r of projection l, block c), rows of k/v by
        # flat offsets into (b h n): plain row gathers, the cheap kind on CPU.
        order = (order + bs * torch.arange(nb, device=dev)[:, None]).flatten(2)  # (b, h, L nb bs) key ids
        slot = (torch.arange(order.shape[2] // bs, device=dev) * bs).view(-1, nb)  # (L, nb) list offsets
        rows = (torch.arange(b * h, device=dev) * n).view(b, h, 1, 1)
        kf, vf = k.reshape(b * h * n, d), v.reshape(b * h * n, d)
        keep_pad = torch.cat([keep, keep.new_zeros(b, 1)], 1)  # id n: an empty slot
        chunk = bs if self.causal else self.opts.query_chunk  # causal: one index block of queries at a time
        outs = []
        for q0 in range(0, n, chunk):
            qi = torch.arange(q0, min(n, q0 + chunk), device=dev)
            c = qi.shape[0]
            start = self._windows(pq[..., qi], sorted_pk, bs)  # (b, h, L, nb, c)
            at = (start + slot[:, :, None])[..., None] + torch.arange(width, device=dev)  # (b, h, L, nb, c, w)
            at = at.permute(0, 1, 4, 2, 3, 5)  # (b, h, c, L, nb, w)
            ok_block = self._block_ok(qi, nb, bs)[:, None, :, None]  # (c, 1, nb, 1)
            cand = order.gather(2, at.reshape(b, h, -1)).view(at.shape)
            cand = torch.where(ok_block, cand, n).flatten(3).sort(-1).values  # (b, h, c, C)
            dup = torch.cat([torch.zeros_like(cand[..., :1], dtype=torch.bool), cand[..., 1:] == cand[..., :-1]], -1)
            cand = torch.where(dup, n, cand).clamp(max=n)
            ok = keep_pad[torch.arange(b, device=dev)[:, None, None, None], cand]
            idx = cand.clamp(max=n - 1)
            qc = q[:, :, qi]
            s = torch.einsum("bhcd,bhckd->bhck", qc, kf[rows + idx]) / math.sqrt(d)
            s = s.masked_fill(~ok, float("-inf"))
            if self.causal:  # the own block (this chunk is one block): a (c x c) matmul, keys j <= i
                own_ok = torch.ones(c, c, dtype=torch.bool, device=dev).tril() & keep[:, None, None, q0 : q0 + c]
                s_own = (qc @ k[:, :, q0 : q0 + c].transpose(-1, -2) / math.sqrt(d)).masked_fill(~own_ok, float("-inf"))
                s = torch.cat([s, s_own], -1)
                idx = torch.cat([idx, qi.expand(b, h, c, c)], -1)
            top, pick = s.topk(min(self.opts.top_k, s.shape[-1]), dim=-1)
            sel = idx.gather(-1, pick)
            outs.append(torch.einsum("bhck,bhckd->bhcd", _softmax_rows(top), vf[rows + sel]))
        return self._finish(torch.cat(outs, 2)), state
