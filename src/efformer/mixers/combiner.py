"""Combiner: full-coverage attention by a factorised conditional expectation (axial and log-sparse).

Paper: "Combiner: Full Attention Transformer with Sparse Computation Cost" (Ren et al., 2021).

Attention is E_{p(j|i)}[v_j]. Combiner partitions every query's support (all keys, or j <= i when
causal) into a direct set Omega_i^0 and regions Omega_i^r, and factorises p(j|i) = p(Omega^r|i) q(j|Omega^r)
inside each region, so a region costs one abstraction instead of one score per key:

    y_i = [ sum_{j in Omega^0} e^{s_ij} v_j + sum_r e^{t_ir} vbar_r ] / [ sum_{j in Omega^0} e^{s_ij} + sum_r e^{t_ir} ]

with s_ij = q_i . k_j / sqrt(d) and, per region (our parametrisation, as the paper leaves the pooling open):
- the region score t_ir = q_i . kbar_r / sqrt(d) + log |Omega^r|, kbar_r the mean of its keys, so a region
  of m equal keys gets exactly the mass of its m keys (log-sum-exp over a constant);
- the region value vbar_r = sum_{j in Omega^r} q(j|Omega^r) v_j, q(j|Omega^r) = softmax_j(w_h . k_j / sqrt(d))
  with a learned per-head vector w_h (zero at init: mean pooling). q(j|Omega) does not depend on the query,
  so region sums are prefix sums over the sequence: O(d) per (query, region).

Variants (each a registered mixer, both directions; the causal partitions cover exactly j <= i):
- ``combiner_axial``: the sequence is a grid of rows of ``block_size`` tokens. Direct: the query's row
  and its column; regions: every other column, restricted to the rows before the query's (causal) or
  to all other rows. O(N (B + N/B) d), O(N sqrt N) at B = sqrt N.
- ``combiner_logsparse``: direct: distances < ``window`` and the log-sparse distances window * 2^k;
  regions: the gaps between them, (window 2^k, window 2^(k+1)) (on both sides when bidirectional).
  O(N (window + log N) d).

The reference form builds each query's partition from ``layout(i, j)`` densely and pools every
region with explicit masked sums; the fast forms gather the direct keys and read region sums from
prefix sums. With a partition whose direct set covers the support (block_size >= N, or window >= N)
Combiner is exactly softmax attention.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pydantic
import torch
from torch import Tensor, nn

from efformer.mixers.base import Capabilities, pad_to_multiple
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.registry import register_mixer

DIRECT, NONE = -1, -2  # layout codes; a region is its id >= 0


def _caps(time: str, memory: str) -> Capabilities:
    return Capabilities(
        family="sparse",
        paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=False,  # regions are prefix abstractions of the whole past; models recompute
        exact=False,
        time=time,
        memory=memory,
        forms=("reference", "fast"),
        rotary=True,
    )


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype prefix sums run in (half types accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CombinerAttention(SoftmaxAttention):
    """Base of the Combiner variants: subclasses define ``layout``, ``n_regions`` and the fast form."""

    reference_below: ClassVar[int] = 128  # the dense reference is quicker for short sequences on CPU

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        # w_h of q(j | region) = softmax_j(w_h . k_j / sqrt d); zero = mean pooling of the region's values.
        self.region_query = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def layout(self, i: Tensor, j: Tensor, n: int) -> Tensor:  # pragma: no cover - abstract
        """Long tensor (broadcast of i, j): DIRECT, NONE or the id of the region of query i holding key j."""
        raise NotImplementedError

    def n_regions(self, n: int) -> int:  # pragma: no cover - abstract
        """How many region ids ``layout`` uses for a sequence of n tokens."""
        raise NotImplementedError

    # ---- shared parts ---------------------------------------------------------------------
    def _heads(self, x, mask, pos):
        """q, k, v (b, h, n, d) with GQA heads repeated, the key keep-mask (b, n) and region weights a (b, h, n)."""
        q, k, v = self.qkv_heads(x, pos)
        keep = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        r = torch.einsum("bhnd,hd->bhn", k, self.region_query.to(k.dtype)) / math.sqrt(self.head_dim)
        r = r.masked_fill(~keep[:, None], float("-inf"))
        c = r.detach().amax(-1, keepdim=True)  # one shift per (batch, head); it cancels in q(j | region)
        a = torch.exp(r - torch.where(torch.isfinite(c), c, 0.0))
        return q, k, v, keep, a

    def _combine(self, terms: list[tuple[Tensor, Tensor, str]]) -> Tensor:
        """One softmax over every term's logits (..., K_t); each term's output einsum(spec, p_t, values_t)."""
        logits = torch.cat([t[0] for t in terms], -1)
        p = logits.softmax(-1)
        out, at = 0, 0
        for s, values, spec in terms:
            out = out + torch.einsum(spec, p[..., at : at + s.shape[-1]], values)
            at += s.shape[-1]
        return out

    @staticmethod
    def _region_logits(q: Tensor, kbar: Tensor, count: Tensor, spec: str) -> Tensor:
        """q . kbar / sqrt(d) + log count (-inf for an empty region)."""
        s = torch.einsum(spec, q, kbar) / math.sqrt(q.shape[-1])
        return s + count.log()

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """The partition written out: dense direct scores, and each region pooled by explicit masked sums."""
        q, k, v, keep, a = self._heads(x, mask, pos)
        n = x.shape[1]
        i = torch.arange(n, device=x.device)[:, None]
        j = torch.arange(n, device=x.device)[None]
        code = self.layout(i, j, n)
        direct = (code == DIRECT) & (keep[:, None, :] | (i == j))  # a padded query still sees itself
        regions = torch.arange(self.n_regions(n), device=x.device)
        member = ((code[:, None, :] == regions[:, None]) & keep[:, None, None, :]).to(q.dtype)[:, None]  # (b,1,n,R,n)
        count = member.sum(-1)
        kbar = (member @ k[:, :, None]) / count.clamp_min(1)[..., None]
        wa = member * a[:, :, None, None, :]
        vbar = (wa @ v[:, :, None]) / wa.sum(-1).clamp_min(torch.finfo(wa.dtype).tiny)[..., None]
        s = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).masked_fill(~direct[:, None], float("-inf"))
        t = self._region_logits(q, kbar, count, "bhnd,bhnrd->bhnr")
        o = self._combine([(s, v, "bhnj,bhjd->bhnd"), (t, vbar, "bhnr,bhnrd->bhnd")])
        return self._finish(o), state


class AxialOptions(SoftmaxOptions):
    """Options of Combiner-Axial."""

    block_size: int = pydantic.Field(
        64, ge=1, description="B: tokens per grid row; direct = own row and column, regions = other columns"
    )


@register_mixer("combiner_axial")
class CombinerAxial(CombinerAttention):
    """Combiner-Axial: direct over the query's row and column of a B-wide grid, one region per other column."""

    capabilities = _caps("O(N (B + N/B) d)", "O(N (B + N/B)) fast, O(N^2 N/B) reference")
    Options = AxialOptions
    test_options = {"block_size": 4, "n_kv_heads": 2}

    def n_regions(self, n):
        """One region per grid column."""
        return min(self.opts.block_size, n)

    def layout(self, i, j, n):
        """Same row or same column: direct; otherwise the region of j's column (all before i when causal)."""
        bs = self.opts.block_size
        same = (i // bs == j // bs) | (i % bs == j % bs)
        code = torch.where(same, DIRECT, j % bs)
        return torch.where(j <= i, code, NONE) if self.causal else code

    def forward_fast(self, x, *, mask, state, pos):
        """Row and column scores on the grid; column regions from prefix (causal) or total (bidirectional) sums."""
        q, k, v, keep, a = self._heads(x, mask, pos)
        b, h, n, d = q.shape
        bs = min(self.opts.block_size, n)
        (q, k, v, a), pad = zip(*(pad_to_multiple(t, bs, dim=2) for t in (q, k, v, a)), strict=True)
        keep = pad_to_multiple(keep, bs, dim=1, value=False)[0]
        rows = q.shape[2] // bs
        q, k, v = (t.view(b, h, rows, bs, d) for t in (q, k, v))
        a, kg = a.view(b, h, rows, bs), keep.view(b, 1, rows, bs)
        dev = x.device
        eye_b, eye_r = torch.eye(bs, dtype=torch.bool, device=dev), torch.eye(rows, dtype=torch.bool, device=dev)
        before_b = torch.ones(bs, bs, dtype=torch.bool, device=dev).tril()  # [c, c']: c' <= c
        before_r = torch.ones(rows, rows, dtype=torch.bool, device=dev).tril(-1)  # [r, s]: s < r
        ninf = float("-inf")

        # Direct: the own row (b, h, r, c, c') and the own column (b, h, r, c, s), the query's own cell once.
        s_row = torch.einsum("bhrcd,bhrkd->bhrck", q, k) / math.sqrt(d)
        ok_row = kg[:, :, :, None, :] | eye_b
        if self.causal:
            ok_row = ok_row & before_b
        s_col = torch.einsum("bhrcd,bhscd->bhrcs", q, k) / math.sqrt(d)
        ok_col = kg.transpose(2, 3)[:, :, None] & (before_r if self.causal else ~eye_r)[:, None]
        # Regions: column c' over the rows before r (causal) or all rows but r.
        acc = _acc(q.dtype)
        kf = kg.to(acc)
        cells = (kf, k.to(acc) * kf[..., None], a.to(acc), (a[..., None] * v).to(acc))
        if self.causal:
            stats = [t.cumsum(2) - t for t in cells]
        else:
            stats = [t.sum(2, keepdim=True) - t for t in cells]
        count, sk, sa, sav = (t.to(q.dtype) for t in stats)
        kbar = sk / count.clamp_min(1)[..., None]
        vbar = sav / sa.clamp_min(torch.finfo(sa.dtype).tiny)[..., None]
        t = self._region_logits(q, kbar, count[:, :, :, None, :].expand(b, h, rows, bs, bs), "bhrcd,bhrkd->bhrck")
        t = t.masked_fill(eye_b, ninf)  # the own column is direct
        o = self._combine([
            (s_row.masked_fill(~ok_row, ninf), v, "bhrck,bhrkd->bhrcd"),
            (s_col.masked_fill(~ok_col, ninf), v, "bhrcs,bhscd->bhrcd"),
            (t, vbar, "bhrck,bhrkd->bhrcd"),
        ])
        return self._finish(o.reshape(b, h, rows * bs, d)[:, :, :n]), state


class LogSparseOptions(SoftmaxOptions):
    """Options of Combiner-Logsparse."""

    window: int = pydantic.Field(
        8, ge=1,
        description="w: distances < w and w * 2^k are direct; the gaps (w 2^k, w 2^(k+1)) are regions",
    )


@register_mixer("combiner_logsparse")
class CombinerLogSparse(CombinerAttention):
    """Combiner-Logsparse: direct at distances < w and w 2^k, one region per gap between them (per side)."""

    capabilities = _caps("O(N (w + log N) d)", "O(N (w + log N)) fast, O(N^2 log N) reference")
    Options = LogSparseOptions
    test_options = {"window": 1, "n_kv_heads": 2}

    def levels(self, n: int) -> int:
        """Gaps (w 2^k, w 2^(k+1)) that can hold a distance < n: k with w 2^k <= n - 2."""
        w, count = self.opts.window, 0
        while w * 2**count <= n - 2:
            count += 1
        return count

    def direct_distances(self, n: int) -> list[int]:
        """0 .. w-1 and w 2^k below n."""
        w = self.opts.window
        out, k = list(range(min(w, n))), 0
        while w * 2**k < n:
            out.append(w * 2**k)
            k += 1
        return out

    def n_regions(self, n):
        """One region per level, per side."""
        return self.levels(n) * (1 if self.causal else 2)

    def layout(self, i, j, n):
        """Distance a = |i - j|: direct if a < w or a / w is a power of two, else region floor(log2(a // w))."""
        w, d = self.opts.window, i - j
        a = d.abs()
        m = a // w
        direct = (a < w) | ((a % w == 0) & ((m & (m - 1)) == 0))
        level = torch.log2(m.clamp(min=1).to(torch.float64)).floor().long()
        code = torch.where(direct, DIRECT, level + self.levels(n) * (d < 0).long())
        return torch.where(d >= 0, code, NONE) if self.causal else code

    def forward_fast(self, x, *, mask, state, pos):
        """Gathered direct keys, regions as differences of prefix sums over the sequence."""
        q, k, v, keep, a = self._heads(x, mask, pos)
        b, h, n, d = q.shape
        w, dev, ninf = self.opts.window, x.device, float("-inf")
        i = torch.arange(n, device=dev)[:, None]
        dist = torch.tensor(self.direct_distances(n), device=dev)
        offsets = dist if self.causal else torch.cat([dist, -dist[dist > 0]])
        j = i - offsets  # (n, K)
        inside = (j >= 0) & (j < n)
        j = j.clamp(0, n - 1)
        ok = inside & (keep[:, j] | (j == i))  # (b, n, K)
        s = torch.einsum("bhnd,bhnkd->bhnk", q, k[:, :, j]) / math.sqrt(d)
        s = s.masked_fill(~ok[:, None], ninf)

        lv = self.levels(n)
        span = w * 2 ** torch.arange(lv, device=dev)
        lo, hi = (i - 2 * span + 1).clamp(0, n), (i - span).clamp(0, n)  # past gaps [lo, hi)
        if not self.causal:
            lo = torch.cat([lo, (i + span + 1).clamp(0, n)], 1)
            hi = torch.cat([hi, (i + 2 * span).clamp(0, n)], 1)
        acc = _acc(q.dtype)
        kf = keep[:, None].to(acc)

        def prefix(t: Tensor) -> Tensor:
            """Sums over [lo, hi) for every (query, region): (b, h, n, R, ...)."""
            p = torch.cat([torch.zeros_like(t[:, :, :1]), t.cumsum(2)], 2)
            return (p[:, :, hi] - p[:, :, lo]).to(q.dtype)

        count = prefix(kf)
        kbar = prefix(k.to(acc) * kf[..., None]) / count.clamp_min(1)[..., None]
        vbar = prefix((a[..., None] * v).to(acc))
        vbar = vbar / prefix(a.to(acc)).clamp_min(torch.finfo(q.dtype).tiny)[..., None]
        t = self._region_logits(q, kbar, count, "bhnd,bhnrd->bhnr")
        o = self._combine([(s, v[:, :, j], "bhnk,bhnkd->bhnd"), (t, vbar, "bhnr,bhnrd->bhnd")])
        return self._finish(o), state
