"""Local attention: block-local, sliding-window and dilated sliding-window softmax attention.

Papers: block-local "Local Attention" as benchmarked in "Long Range Arena: A Benchmark for Efficient
Transformers" (Tay et al., 2020); sliding and dilated windows from "Longformer: The Long-Document
Transformer" (Beltagy et al., 2020).

Every mixer here and in ``sparse.py`` is softmax attention restricted to a fixed pattern of allowed
(query index, key index) pairs, ``pattern(i, j)``, on sequence indices (0 is the first token; decoded
tokens continue the count), not on ``positions``, so left padding only truncates windows at the start.
The reference form masks a dense N x N score matrix with the pattern. The fast form splits the
pattern into disjoint :class:`Part` s; each groups queries (G, B) and gathers only the keys (G, K) that
group may see, so memory is O(N K) and no N x N matrix exists. Parts are merged with a log-sum-exp
softmax, as in FlashAttention. Lengths that are not multiples of a group pad into empty slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.mixers.base import Capabilities
from efformer.mixers.softmax import KVState, SoftmaxAttention, SoftmaxOptions, needs_graph
from efformer.nn.positional import PositionalContext
from efformer.registry import register_mixer

Rule = Callable[[Tensor, Tensor], Tensor]  # (query index, key index) long tensors -> bool, broadcast


@dataclass(kw_only=True)
class PatternKVState(KVState):
    """KV cache (see KVState) plus each key's sequence index (batch, t); windows trim it to a bounded size."""

    index_buf: Tensor
    time_dims: ClassVar[dict[str, int]] = {**KVState.time_dims, "index_buf": 1}

    @property
    def index(self) -> Tensor:
        """Sequence index of each cached key (batch, t), ascending."""
        return self.index_buf[:, : self.length]

    def extend(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None, index: Tensor,
               graph: bool | None = None) -> None:
        """Append keys/values (batch, kv_heads, n, d) with positions, keep-mask (None: all kept), indices (batch, n)."""
        if keep is not None and not self.padded:
            self.padded = not bool(keep.all())
        if graph is None:
            graph = needs_graph(k, v)
        self._write({"k_buf": k, "v_buf": v, "pos_buf": positions, "keep_buf": keep, "index_buf": index}, graph)

    def trim(self, cols: Tensor) -> None:
        """Keep only the cached keys where ``cols`` (t,) is True (moved to the front of the buffers)."""
        if bool(cols.all()):
            return
        graph = any(getattr(self, name).requires_grad for name in self.time_dims)
        kept = {name: getattr(self, name).narrow(d, 0, self.length)[(slice(None),) * d + (cols,)]
                for name, d in self.time_dims.items()}
        m = kept["k_buf"].shape[2]
        for name, x in kept.items():
            if graph:  # new tensors, as before: never write into ones autograd may have saved
                setattr(self, name, x)
            else:
                getattr(self, name).narrow(self.time_dims[name], 0, m).copy_(x)
        self.length = m
        if self.padded:
            self.padded = not bool(self.keep.all())


@dataclass
class Ctx:
    """Where one call's queries and keys sit: query offset, key indices (t,), positions, keep-masks."""

    q0: int  # sequence index of the first query
    k_index: Tensor  # (t,) ascending sequence indices of the keys
    q_pos: Tensor  # (b, n) positions for rotary/bias
    k_pos: Tensor  # (b, t)
    q_keep: Tensor | None  # (b, n), None when nothing is padded
    k_keep: Tensor | None  # (b, t)
    pos: PositionalContext  # the model's positional context (score bias, if any)

    @property
    def seg(self) -> Tensor | None:
        """Segment ids (b, n) of a packed call (queries and keys alike: packing runs without a cache)."""
        return self.pos.segments


@dataclass
class Part:
    """One disjoint piece of a pattern: query groups (G, B), the keys (G, K) each gathers (-1 = empty)."""

    q: Tensor
    k: Tensor
    only: Rule | None = None  # extra condition that keeps this part disjoint from the others


def _append_row(x: Tensor, dim: int, value=0) -> Tensor:
    """``x`` with one more entry of ``value`` along ``dim`` (the target of empty gather slots)."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def window_part(q0: int, n: int, window: int, dilation: int, causal: bool, device, only: Rule | None = None) -> Part:
    """Queries [q0, q0+n) grouped per residue mod ``dilation`` in runs of B; keys within ``window`` steps."""
    per = -(-n // dilation)  # most queries in one residue class
    b = max(1, min(window, per))
    runs = -(-per // b)
    r = torch.arange(dilation, device=device)[:, None, None]
    m = torch.arange(runs, device=device)[None, :, None] * b + torch.arange(b, device=device)
    q = (q0 + r + m * dilation).reshape(-1, b)
    hi = b - 1 + (0 if causal else window - 1)
    k = q[:, :1] + torch.arange(-(window - 1), hi + 1, device=device) * dilation
    return Part(q, k, only)


def block_part(q0: int, n: int, block: int, device, only: Rule | None = None) -> tuple[Part, Tensor]:
    """Aligned blocks of ``block`` queries covering [q0, q0+n), each gathering its own block; and the block ids."""
    blocks = torch.arange(q0 // block, (q0 + n - 1) // block + 1, device=device)
    q = blocks[:, None] * block + torch.arange(block, device=device)
    return Part(q, q, only), blocks


class PatternAttention(SoftmaxAttention):
    """Softmax attention restricted to ``pattern(i, j)``: dense masked reference, gathered fast form.

    Subclasses define :meth:`pattern`, :meth:`parts` (disjoint pieces covering it) and, for bounded
    decode state, :meth:`state_keep`. Weights are laid out as in SoftmaxAttention, so they transfer.
    """

    # Dense masked attention beats gathering key blocks up to ~512 tokens on CPU (measured:
    # bigbird/sliding_window/local at N=128 and 512, batch 32, d_model 64).
    reference_below = 512

    def pattern(self, i: Tensor, j: Tensor, length: int) -> Tensor:  # pragma: no cover - abstract
        """Bool: may query index i see key index j (broadcast long tensors); causality is added apart."""
        raise NotImplementedError

    def parts(self, q0: int, n: int, length: int, device) -> list[Part]:  # pragma: no cover - abstract
        """Disjoint pieces of the pattern for queries [q0, q0+n) of a sequence of ``length`` tokens."""
        raise NotImplementedError

    def state_keep(self, j: Tensor, next_q: int) -> Tensor:
        """Bool (t,): cached keys j that some query >= next_q may still see (causal decoding)."""
        return torch.ones_like(j, dtype=torch.bool)

    def allowed(self, i: Tensor, j: Tensor, length: int) -> Tensor:
        """The pattern, cut to j <= i when causal."""
        keep = self.pattern(i, j, length)
        return keep & (j <= i) if self.causal else keep

    def init_state(self, batch, device, dtype) -> PatternKVState:
        """An empty cache; windowed mixers keep it bounded."""
        return PatternKVState.empty(batch, self.n_kv_heads, self.head_dim, device, dtype,
                                    index_buf=torch.zeros(batch, 0, dtype=torch.long, device=device))

    # ---- shared parts of both forms -------------------------------------------------------
    def _prepare(self, x, mask, state, pos: PositionalContext) -> tuple[Tensor, Tensor, Tensor, Ctx]:
        """q (b, h, n, d); k, v (b, h, t, d) including the cache, heads repeated for GQA; the Ctx."""
        b, n, _ = x.shape
        positions = pos.positions
        q, k, v = self._qkv(x, pos)
        q0 = state.seen if state is not None else 0
        index = torch.arange(q0, q0 + n, device=x.device)
        k_index, k_pos, has_pad = index, positions, mask is not None
        if state is not None:
            state.extend(k, v, positions, mask, index.expand(b, n), graph=needs_graph(q, k, v))
            k, v, k_pos, k_index = state.k, state.v, state.positions, state.index[0]
            has_pad = has_pad or state.padded
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_keep = k_keep = None
        if has_pad:
            q_keep = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
            k_keep = state.keep if state is not None else q_keep
        ctx = Ctx(q0, k_index, positions, k_pos, q_keep, k_keep, pos)
        return q, k, v, ctx

    def _done(self, o: Tensor, state, ctx: Ctx):
        if state is not None and self.causal:
            state.trim(self.state_keep(state.index[0], ctx.q0 + o.shape[2]))
        return self._finish(o), state

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Dense scores masked to the pattern, softmax, times V: O(N^2) memory."""
        q, k, v, ctx = self._prepare(x, mask, state, pos)
        return self._done(self.attend_reference(q, k, v, ctx), state, ctx)

    def forward_fast(self, x, *, mask, state, pos):
        """Only the gathered key groups of each query group: O(N K) memory, no N x N matrix."""
        q, k, v, ctx = self._prepare(x, mask, state, pos)
        return self._done(self.attend_fast(q, k, v, ctx), state, ctx)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx) -> Tensor:
        """q (b, h, n, d), k/v (b, h, t, d) -> (b, h, n, d) by masked dense softmax attention."""
        n = q.shape[2]
        i = torch.arange(ctx.q0, ctx.q0 + n, device=q.device)[:, None]
        allowed = self.allowed(i, ctx.k_index[None, :], ctx.q0 + n)[None]  # (1, n, t)
        if ctx.k_keep is not None:  # real queries never see padded keys; padded queries see their pattern
            allowed = allowed & (ctx.k_keep[:, None, :] | ~ctx.q_keep[:, :, None])
        if ctx.seg is not None:  # packed rows: only keys of the query's own segment
            allowed = allowed & (ctx.seg[:, :, None] == ctx.seg[:, None, :])
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if ctx.pos.bias is not None:
            scores = scores + ctx.pos.score_bias(ctx.q_pos, ctx.k_pos)
        p = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        return F.dropout(p, self.dropout, self.training) @ v

    def attend_fast(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx) -> Tensor:
        """q (b, h, n, d), k/v (b, h, t, d) -> (b, h, n, d), one gathered block softmax per part."""
        n = q.shape[2]
        q, k, v = _append_row(q, 2), _append_row(k, 2), _append_row(v, 2)
        pieces = [self._attend_part(q, k, v, ctx, part, n) for part in self.parts(ctx.q0, n, ctx.q0 + n, q.device)]
        nums, maxes, sums = (torch.stack(z) for z in zip(*pieces, strict=True))
        top = maxes.amax(0)
        top = torch.where(torch.isfinite(top), top, 0.0)
        w = torch.exp(maxes - top)  # each part's rescale to the common maximum (0 for empty rows)
        den = (sums * w).sum(0).clamp_min(torch.finfo(sums.dtype).tiny)
        return (nums * w[..., None]).sum(0) / den[..., None]

    def _attend_part(self, q, k, v, ctx: Ctx, part: Part, n: int):
        """Unnormalised output, row max and row sum (b, h, n[, d]) of one part, in query order."""
        b, h, _, d = q.shape
        t = k.shape[2] - 1
        qi, kj = part.q, part.k
        qs = qi - ctx.q0
        q_ok = (qs >= 0) & (qs < n)
        qs = torch.where(q_ok, qs, n)
        ks = torch.searchsorted(ctx.k_index, kj.contiguous()).clamp(max=t - 1)  # keys may be a trimmed cache
        k_ok = (kj >= 0) & (ctx.k_index[ks] == kj)
        ks = torch.where(k_ok, ks, t)
        i, j = qi[:, :, None], kj[:, None, :]
        allowed = self.allowed(i, j, ctx.q0 + n) & q_ok[:, :, None] & k_ok[:, None, :]
        if part.only is not None:
            allowed = allowed & part.only(i, j)
        allowed = allowed[None]
        if ctx.k_keep is not None:
            kk = _append_row(ctx.k_keep, 1, False)[:, ks]  # (b, G, K)
            qk = _append_row(ctx.q_keep, 1, True)[:, qs]  # (b, G, B)
            allowed = allowed & (kk[:, :, None, :] | ~qk[..., None])
        if ctx.seg is not None:  # the appended slots never match: -1 for queries, -2 for keys
            qg, kg = _append_row(ctx.seg, 1, -1)[:, qs], _append_row(ctx.seg, 1, -2)[:, ks]
            allowed = allowed & (qg[..., None] == kg[:, :, None, :])
        s = torch.einsum("bhgid,bhgjd->bhgij", q[:, :, qs], k[:, :, ks]) / math.sqrt(d)
        if ctx.pos.bias is not None:
            qp = _append_row(ctx.q_pos, 1)[:, qs].flatten(0, 1)
            kp = _append_row(ctx.k_pos, 1)[:, ks].flatten(0, 1)
            s = s + ctx.pos.score_bias(qp, kp).unflatten(0, (b, -1)).transpose(1, 2)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        top = s.amax(-1).detach()  # the result does not depend on it, so no gradient is needed
        p = torch.exp(s - torch.where(torch.isfinite(top), top, 0.0)[..., None])
        total = p.sum(-1)
        num = F.dropout(p, self.dropout, self.training) @ v[:, :, ks]  # (b, h, G, B, d)
        # Each query sits in at most one slot of a part; queries outside the part read an empty slot.
        slots = qi.numel()
        inv = torch.full((n,), slots, dtype=torch.long, device=q.device)
        inv[qs[q_ok]] = torch.arange(slots, device=q.device).view_as(qs)[q_ok]
        num = _append_row(num.flatten(2, 3), 2)[:, :, inv]
        top = _append_row(top.flatten(2, 3), 2, float("-inf"))[:, :, inv]
        total = _append_row(total.flatten(2, 3), 2)[:, :, inv]
        return num, top, total


def pattern_caps(paper: str, time: str, memory: str, family: str = "local", packing: bool = False) -> Capabilities:
    """Capabilities shared by every pattern-restricted softmax attention; ``packing`` for patterns that
    depend on i - j only (a segment then sees exactly what it would see alone)."""
    return Capabilities(
        family=family,
        paper=paper,
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time=time,
        memory=memory,
        forms=("reference", "fast"),
        attention_bias=True,
        rotary=True,
        packing=packing,
    )


class LocalOptions(SoftmaxOptions):
    """Options of block-local attention."""

    block_size: int = pydantic.Field(64, ge=1, description="queries see only keys of their own aligned block")


@register_mixer("local")
class LocalAttention(PatternAttention):
    """Block-local attention: query i sees key j iff i // block == j // block (and j <= i when causal)."""

    capabilities = pattern_caps(
        "Long Range Arena: A Benchmark for Efficient Transformers", "O(N B d)", "O(N B) fast, O(N^2) reference"
    )
    Options = LocalOptions
    test_options = {"block_size": 4, "n_kv_heads": 2}

    def pattern(self, i, j, length):
        """Same aligned block."""
        return i // self.opts.block_size == j // self.opts.block_size

    def parts(self, q0, n, length, device):
        """One part: each block gathers itself."""
        return [block_part(q0, n, self.opts.block_size, device)[0]]

    def state_keep(self, j, next_q):
        """Only the current block's keys: fewer than block_size."""
        return j >= next_q // self.opts.block_size * self.opts.block_size


class SlidingWindowOptions(SoftmaxOptions):
    """Options of sliding-window attention."""

    # Keys seen on each side, counting the query itself: causal i - window < j <= i;
    # bidirectional |i - j| < window (2 * window - 1 keys). window >= N is full attention.
    window: int = pydantic.Field(128, ge=1, description="w: keys within distance w - 1 of the query (the query too)")


@register_mixer("sliding_window")
class SlidingWindowAttention(PatternAttention):
    """Sliding-window attention: query i sees keys j with |i - j| < window (j <= i when causal)."""

    capabilities = pattern_caps(
        "Longformer: The Long-Document Transformer", "O(N w d)", "O(N w) fast, O(w) decode state, O(N^2) reference",
        packing=True,
    )
    Options = SlidingWindowOptions
    test_options = {"window": 3}

    @property
    def dilation(self) -> int:
        """Spacing of the keys in the window (1 here)."""
        return 1

    def pattern(self, i, j, length):
        """Within ``window`` steps of ``dilation`` tokens, on the query's residue class."""
        r, s = i - j, self.dilation
        return (r.abs() < self.opts.window * s) & (r % s == 0)

    def parts(self, q0, n, length, device):
        """One part: runs of queries gather the union of their windows."""
        return [window_part(q0, n, self.opts.window, self.dilation, self.causal, device)]

    def state_keep(self, j, next_q):
        """The last (window - 1) * dilation keys: all a later query can reach."""
        return j >= next_q - (self.opts.window - 1) * self.dilation


class DilatedWindowOptions(SlidingWindowOptions):
    """Options of dilated sliding-window attention."""

    dilation: int = pydantic.Field(
        2, ge=1,
        description="keys i, i -/+ dilation, i -/+ 2 dilation, ... (window of them)",
    )


@register_mixer("dilated_window")
class DilatedWindowAttention(SlidingWindowAttention):
    """Dilated sliding window: keys j with (i - j) % dilation == 0 and |i - j| < window * dilation."""

    capabilities = pattern_caps(
        "Longformer: The Long-Document Transformer",
        "O(N w d)",
        "O(N w) fast, O(w * dilation) decode state, O(N^2) reference",
        packing=True,
    )
    Options = DilatedWindowOptions
    test_options = {"window": 2, "dilation": 2}

    @property
    def dilation(self) -> int:
        """Spacing of the keys in the window."""
        return self.opts.dilation
