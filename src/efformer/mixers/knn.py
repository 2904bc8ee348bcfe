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
pooled, scored exactly, and the top k kept. Bidirectional queries search every block. Causal queries scan
their own block of B = ``index_block`` keys directly (j <= i, one small matmul) and search a dyadic
(Fenwick) set of earlier blocks: the index has levels of blocks of B 2^l keys, and a query whose level-l
block number is odd searches the level-l block just before it, so the blocks a query searches tile
[0, B floor(i / B)) exactly once, O(log(N / B)) of them, none containing a later key. Every block is
indexed once per sequence and all queries' windows come from one batched binary search per level.
``metric="cosine"`` searches by angle instead of the lift (exact top-k still ranks by q.k): 1-D
projections find near neighbours only when they are near, and after the lift a query's best key is near
it only if that key has the largest norm. With probe >= index_block / 2 (causal: >= N / 2) every key is a
candidate, and with k = N the result is softmax attention exactly.

The reference form writes the candidate set densely from the ranks (query window vs key rank) and
takes a masked top-k of the full score matrix; the fast form gathers only candidates (as whole rows, the
cheap gather on CPU), one chunk of queries at a time: O(N (C d + L log N)) time with C = 2 L probe times
the blocks searched (bidirectional N / B; causal log2(N / B), + B scanned), O(chunk C d) memory. On a CPU
a gathered candidate costs about as much as tens of keys of a fused dense kernel (SDPA), so the fast form
only wins when C is a small fraction of N (benchmarks/bench_iceformer.py).
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
        time="O(N (C d + L log N)), C = 2 L probe N/B (causal: 2 L probe log2(N/B) + B)",
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

    def _levels(self, n: int) -> tuple[int, list[int]]:
        """(B, the index block sizes): bidirectional, one level of B = ``index_block`` keys (every block
        searched); causal, the dyadic sizes B 2^l that the prefix before a query's own block of B keys
        decomposes into (2^l <= the last block's number; none when there is one block)."""
        bs = min(self.opts.index_block, n)
        if not self.causal:
            return bs, [bs]
        return bs, [bs << lvl for lvl in range((-(-n // bs) - 1).bit_length())]

    @torch.no_grad()
    def _index(self, q: Tensor, k: Tensor, keep: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The index over blocks of ``size`` keys: per block and projection, the sorted lifted-key projections
        and their ids within the block (b, h, L, blocks, size); the unit queries' projections (b, h, L, n),
        which a block scales by its lift radius M (b, h, blocks) before searching.

        Each block is lifted with its own largest key norm M, so a block's index depends on its keys only.
        """
        d = k.shape[-1]
        k = pad_to_multiple(k, size, dim=2)[0].unflatten(2, (-1, size))  # (b, h, blocks, B, d)
        keep = pad_to_multiple(keep, size, dim=1, value=False)[0].unflatten(1, (-1, size))[:, None]  # (b, 1, blocks, B)
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
        sorted_pk, order = pk.sort(-1)
        return sorted_pk, order, torch.einsum("bhnd,ld->bhln", unit, u[:, :d]), m2[..., 0].sqrt()

    @torch.no_grad()
    def _windows(self, pq: Tensor, sorted_pk: Tensor, size: int) -> Tensor:
        """First rank (..., m) of each query's window of 2 probe keys in sorted lists (..., size); pq (..., m)."""
        where = torch.searchsorted(sorted_pk.contiguous(), pq.contiguous())
        width = min(2 * self.opts.probe, size)
        return (where - self.opts.probe).clamp(0, size - width)

    def _block_ok(self, q_idx: Tensor, blocks: int, size: int) -> Tensor:
        """Bool (n, blocks): may query i search block c of the level with blocks of ``size`` keys. Causal: query
        i's level block is i // size; when that is odd, it searches the block just before it, so over the
        levels a query searches the dyadic blocks that tile [0, B (i // B)), each once."""
        c = torch.arange(blocks, device=q_idx.device)
        if not self.causal:
            return torch.ones(q_idx.shape[0], blocks, dtype=torch.bool, device=q_idx.device)
        hi = q_idx // size
        return (hi % 2 == 1)[:, None] & (c[None] == (hi - 1)[:, None])

    def _window_ids(self, order: Tensor, start: Tensor, size: int, first: Tensor) -> Tensor:
        """Key ids (..., blocks, m, w) of the windows ``start`` (..., blocks, m) in the sorted lists ``order``
        (..., blocks, size), made absolute by each block's first key id ``first`` (blocks,)."""
        at = start[..., None] + torch.arange(min(2 * self.opts.probe, size), device=start.device)
        return order.gather(-1, at.flatten(-2)).view(at.shape) + first[:, None, None]

    @torch.no_grad()
    def _causal_candidates(self, q: Tensor, k: Tensor, keep: Tensor, levels: list[int]) -> Tensor:
        """Candidate key ids (b, h, n, C) of every query from the earlier blocks' indices (-1: no candidate),
        C = 2 probe L per level. At each level only the odd blocks of queries search (the even block before)."""
        b, h, n, _ = q.shape
        out = []
        for size in levels:
            sorted_pk, order, qp, scale = self._index(q, k, keep, size)
            nb = order.shape[3]
            odd = slice(1, 2 * (nb // 2), 2)
            even = slice(0, 2 * (nb // 2), 2)
            pq = pad_to_multiple(qp, size, dim=3)[0].unflatten(3, (-1, size))[:, :, :, odd]  # (b, h, L, nb/2, B)
            start = self._windows(pq * scale[:, :, None, even, None], sorted_pk[:, :, :, even], size)
            ids = self._window_ids(order[:, :, :, even], start, size, 2 * size * torch.arange(nb // 2, device=q.device))
            full = ids.new_full((b, h, ids.shape[2], nb, size, ids.shape[-1]), -1)
            full[:, :, :, odd] = ids
            out.append(full.permute(0, 1, 3, 4, 2, 5).flatten(2, 3)[:, :, :n].flatten(3))  # (b, h, n, L w)
        if not out:
            return q.new_full((b, h, n, 0), -1, dtype=torch.long)
        return torch.cat(out, -1)

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Candidates written densely (key rank inside a query's window of a block it may search, own block
        j <= i when causal), masked top-k of the full score matrix, softmax over the kept scores."""
        q, k, v, keep = self._heads(x, mask, pos)
        n = x.shape[1]
        j = torch.arange(n, device=x.device)
        i = j[:, None]
        bs, levels = self._levels(n)
        cand = torch.zeros(n, n, dtype=torch.bool, device=x.device)
        for size in levels:
            sorted_pk, order, qp, scale = self._index(q, k, keep, size)
            start = self._windows(qp[:, :, :, None] * scale[:, :, None, :, None], sorted_pk, size)  # (b,h,L,nb,n)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(size, device=x.device).expand_as(order))
            rank = rank.flatten(3)[..., :n]  # (b, h, L, n_keys): rank of each key in its block's sorted list
            blk = j // size
            st = start[:, :, :, blk].transpose(-1, -2)  # (b, h, L, n_q, n_keys): the window start in key j's block
            inside = (rank[:, :, :, None, :] >= st) & (rank[:, :, :, None, :] < st + min(2 * self.opts.probe, size))
            cand = cand | (inside.any(2) & self._block_ok(j, order.shape[3], size)[:, blk])
        if self.causal:
            cand = cand | ((j[None] // bs == i // bs) & (j[None] <= i))
        cand = cand & keep[:, None, None, :]
        s = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~cand, float("-inf"))
        kk = min(self.opts.top_k, n)
        chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(kk, dim=-1).indices, True) & cand
        return self._finish(_softmax_rows(s.masked_fill(~chosen, float("-inf"))) @ v), state

    def forward_fast(self, x, *, mask, state, pos):
        """Per chunk of queries: candidate ids from the index (causal: computed for all queries at once, one
        batched binary search per level), gathered as rows of k, exact scores (causal: the own block by one
        matmul), top-k, softmax over the kept scores, the k values gathered as rows."""
        q, k, v, keep = self._heads(x, mask, pos)
        b, h, n, d = q.shape
        bs, levels = self._levels(n)
        kf, vf = k.reshape(b * h * n, d), v.reshape(b * h * n, d)
        rows = (torch.arange(b * h, device=x.device) * n).view(b, h, 1, 1)
        keep_bh = keep[:, None].expand(b, h, n).reshape(-1)
        if self.causal:
            cands = self._causal_candidates(q, k, keep, levels)
            # chunks never cross an index block, so each has one own block of keys j <= i to scan
            chunk = min(self.opts.query_chunk, bs)
            spans = [(c0, min(c0 + chunk, s0 + bs, n), s0) for s0 in range(0, n, bs)
                     for c0 in range(s0, min(s0 + bs, n), chunk)]
        else:
            sorted_pk, order, qp, scale = self._index(q, k, keep, bs)
            spans = [(c0, min(n, c0 + self.opts.query_chunk), None) for c0 in range(0, n, self.opts.query_chunk)]
        outs = []
        for c0, c1, s0 in spans:
            qc = q[:, :, c0:c1]
            if self.causal:
                cand = cands[:, :, c0:c1]
            else:
                start = self._windows(qp[:, :, :, None, c0:c1] * scale[:, :, None, :, None], sorted_pk, bs)
                first = bs * torch.arange(order.shape[3], device=x.device)
                cand = self._window_ids(order, start, bs, first).permute(0, 1, 4, 2, 3, 5).flatten(3)  # (b, h, c, C)
                cand = torch.where(cand < n, cand, -1)  # the padding of the last block
            idx, s = self._candidate_scores(qc, cand, kf, keep_bh, rows)
            if self.causal:  # the own block: a (c x block) matmul over keys s0 <= j <= i
                s1 = min(s0 + bs, n)
                qi = torch.arange(c0, c1, device=x.device)
                own = torch.arange(s0, s1, device=x.device)
                own_ok = (own[None] <= qi[:, None]) & keep[:, None, None, s0:s1]
                s_own = (qc @ k[:, :, s0:s1].transpose(-1, -2) / math.sqrt(d)).masked_fill(~own_ok, float("-inf"))
                s = torch.cat([s, s_own], -1)
                idx = torch.cat([idx, own.expand(b, h, c1 - c0, s1 - s0)], -1)
            top, pick = s.topk(min(self.opts.top_k, s.shape[-1]), dim=-1)
            sel = (rows + idx.gather(-1, pick)).flatten()
            vals = vf.index_select(0, sel).view(*pick.shape, d)
            outs.append((_softmax_rows(top)[..., None, :] @ vals)[..., 0, :])
        return self._finish(torch.cat(outs, 2)), state

    @staticmethod
    def _candidate_scores(qc: Tensor, cand: Tensor, kf: Tensor, keep_bh: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Deduplicated candidate ids (b, h, c, C) (a repeat or none: -1 -> id 0, score -inf) and their scores
        q.k / sqrt(d) (b, h, c, C), keys gathered as whole rows of the flat (b h n, d) keys."""
        with torch.no_grad():
            cand = cand.sort(-1).values
            dup = torch.cat([torch.zeros_like(cand[..., :1], dtype=torch.bool), cand[..., 1:] == cand[..., :-1]], -1)
            cand = torch.where(dup, -1, cand)
            flat = (rows + cand.clamp_min(0)).flatten()
            ok = (cand >= 0) & keep_bh[flat].view(cand.shape)
        kc = kf.index_select(0, flat).view(*cand.shape, kf.shape[-1])  # (b, h, c, C, d)
        s = (qc[..., None, :] @ kc.transpose(-1, -2))[..., 0, :] / math.sqrt(kf.shape[-1])  # (1 x d)(d x C): 4x
        # faster on CPU than (C x d)(d x 1)
        return cand.clamp_min(0), s.masked_fill(~ok, float("-inf"))
