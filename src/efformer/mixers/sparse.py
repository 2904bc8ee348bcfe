"""Sparse attention patterns: Longformer, Sparse Transformer (strided, fixed) and BigBird.

Papers: "Longformer: The Long-Document Transformer" (Beltagy et al., 2020); "Generating Long
Sequences with Sparse Transformers" (Child et al., 2019); "Big Bird: Transformers for Longer
Sequences" (Zaheer et al., 2020).

Each mixer is a :class:`~efformer.mixers.local.PatternAttention`: a plainly written ``pattern(i, j)``
used by the dense reference, and disjoint gathered parts (window, strided columns, summary columns,
global rows/columns, random blocks) used by the fast form. Causal variants are the bidirectional
pattern cut to j <= i; BigBird's causal random blocks are drawn only from earlier blocks, so a
query's pattern never depends on later tokens and cached decoding is exact.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
from torch import Tensor

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities
from efformer.mixers.local import Part, PatternAttention, block_part, pattern_caps, window_part
from efformer.mixers.softmax import SoftmaxOptions
from efformer.registry import register_mixer


def _caps(paper: str, time: str, memory: str) -> Capabilities:
    return pattern_caps(paper, time, memory, family="sparse")


def _all_rows(q0: int, n: int, end: int, length: int, device) -> Part | None:
    """Queries [q0, min(end, q0+n)) as one group gathering every key < length; None if empty."""
    stop = min(end, q0 + n)
    if stop <= q0:
        return None
    return Part(torch.arange(q0, stop, device=device)[None], torch.arange(length, device=device)[None])


class LongformerOptions(SoftmaxOptions):
    """Options of Longformer attention."""

    # Keys on each side counting the query (as in sliding_window): |i - j| < window. The paper's
    # total window w corresponds to window = w / 2 + 1.
    window: int = pydantic.Field(128, ge=1, description="local window w around each token")
    global_tokens: int = pydantic.Field(1, ge=0, description="the first g tokens attend to, and are seen by, all")


@register_mixer("longformer")
class LongformerAttention(PatternAttention):
    """Sliding window plus global tokens: i sees j iff |i - j| < window or i < g or j < g."""

    capabilities = _caps(
        "Longformer: The Long-Document Transformer",
        "O(N (w + g) d)",
        "O(N (w + g)) fast, O(w + g) decode state, O(N^2) reference",
    )
    Options = LongformerOptions
    test_options = {"window": 2, "global_tokens": 2, "n_kv_heads": 2}

    def pattern(self, i, j, length):
        """Window, global rows and global columns."""
        g = self.opts.global_tokens
        return ((i - j).abs() < self.opts.window) | (i < g) | (j < g)

    def parts(self, q0, n, length, device):
        """Window (non-global rows/columns), global columns, global rows."""
        g, w = self.opts.global_tokens, self.opts.window
        window = window_part(q0, n, w, 1, self.causal, device, only=lambda i, j: (i >= g) & (j >= g))
        parts = [window]
        if g:
            cols = torch.arange(min(g, length), device=device).expand(window.q.shape[0], -1)
            parts.append(Part(window.q, cols, only=lambda i, j: i >= g))
            rows = _all_rows(q0, n, g, length, device)
            if rows is not None:
                parts.append(rows)  # its queries i < g appear in no other part
        return parts

    def state_keep(self, j, next_q):
        """The global tokens and the last window - 1 keys."""
        return (j < self.opts.global_tokens) | (j >= next_q - (self.opts.window - 1))


class SparseTransformerOptions(SoftmaxOptions):
    """Options of Sparse Transformer attention."""

    pattern: Literal["strided", "fixed"] = pydantic.Field(
        "strided", description="strided (local + every stride-th key) or fixed (blocks + summary columns)"
    )
    # l: strided sees the last l keys and every l-th key before; fixed sees its block of l keys and
    # the summary keys of every block. l near sqrt(N) gives O(N sqrt N).
    stride: int = pydantic.Field(128, ge=1, description="l: local span and the step of the strided keys")
    summary: int = pydantic.Field(1, ge=1, description="fixed: the last `summary` keys of each block (the paper's c)")


@register_mixer("sparse_transformer")
class SparseTransformerAttention(PatternAttention):
    """Sparse Transformer: strided (|i-j| < l or l | i-j) or fixed (same block or a summary key)."""

    capabilities = _caps(
        "Generating Long Sequences with Sparse Transformers",
        "O(N (l + N/l) d) strided, O(N (l + c N/l) d) fixed",
        "O(N (l + N/l)) fast, O(N) decode state (keys of every stride), O(N^2) reference",
    )
    Options = SparseTransformerOptions
    test_options = {"stride": 3}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        if self.opts.summary > self.opts.stride:
            raise ConfigError(f"{self.name}.summary", self.opts.summary, f"must be at most stride={self.opts.stride}")

    def pattern(self, i, j, length):
        """The merged pattern of the paper's two heads, attended by one head."""
        ell = self.opts.stride
        if self.opts.pattern == "strided":
            r = i - j
            return (r.abs() < ell) | (r % ell == 0)
        return (i // ell == j // ell) | (j % ell >= ell - self.opts.summary)

    def parts(self, q0, n, length, device):
        """Strided: window + per-residue columns; fixed: own block + other blocks' summary keys."""
        ell = self.opts.stride
        if self.opts.pattern == "strided":
            window = window_part(q0, n, ell, 1, self.causal, device, only=lambda i, j: (i - j).abs() < ell)
            # One group per residue class of the queries; it gathers every key of that residue.
            per, cols = -(-n // ell), -(-length // ell)
            r = torch.arange(min(ell, n), device=device)[:, None]
            q = q0 + r + ell * torch.arange(per, device=device)
            k = (q0 + r) % ell + ell * torch.arange(cols, device=device)
            return [window, Part(q, k, only=lambda i, j: (i - j).abs() >= ell)]
        block, _ = block_part(q0, n, ell, device)
        c = self.opts.summary
        ends = torch.arange(-(-length // ell), device=device)[:, None] * ell + ell - c
        summary = (ends + torch.arange(c, device=device)).flatten().expand(block.q.shape[0], -1)
        return [block, Part(block.q, summary, only=lambda i, j: i // ell != j // ell)]


class BigBirdOptions(SoftmaxOptions):
    """Options of BigBird attention."""

    block_size: int = pydantic.Field(64, ge=1, description="tokens per block (window, global and random parts)")
    num_random_blocks: int = pydantic.Field(3, ge=0, description="random key blocks per query block")
    num_global_blocks: int = pydantic.Field(2, ge=0, description="the first blocks: attend to, and are seen by, all")


def _mix(x: Tensor) -> Tensor:
    """A fixed 31-bit integer hash of non-negative int64 values (no overflow: products stay < 2^58)."""
    for _ in range(3):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0x7FFFFFFF
    return x


@register_mixer("bigbird")
class BigBirdAttention(PatternAttention):
    """BigBird: blocks see their neighbour blocks, the global blocks and random blocks; global blocks see all.

    Random blocks of query block q are a fixed hash of (seed, q, slot): bidirectional ones avoid the
    window and global blocks; causal ones come from [g, q - 1), strictly before the window. The seed
    is a buffer drawn from the global torch RNG; :meth:`redraw_random_blocks` draws a new one.
    """

    capabilities = _caps(
        "Big Bird: Transformers for Longer Sequences",
        "O(N (3 + r + 2 g) B d)",
        "O(N (3 + r + g) B) fast, O(N) decode state, O(N^2) reference",
    )
    Options = BigBirdOptions
    test_options = {"block_size": 2, "num_random_blocks": 1, "num_global_blocks": 1}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))
        self.redraw_random_blocks()

    def redraw_random_blocks(self) -> None:
        """Draw a new random-block seed from the global torch RNG."""
        self.seed.fill_(int(torch.randint(0, 2**31 - 1, ())))

    def random_blocks(self, qb: Tensor, nb: int) -> Tensor:
        """(len(qb), r) random key blocks of query blocks ``qb`` in a sequence of ``nb`` blocks; -1 = none."""
        g, r = self.opts.num_global_blocks, self.opts.num_random_blocks
        slot = torch.arange(r, device=qb.device)
        x = _mix(_mix((self.seed + qb[:, None] * 0x9E3779B1) & 0x7FFFFFFF) ^ slot)
        if self.causal:
            count = (qb[:, None] - 1 - g).clamp(min=0)
            pick = g + x % count.clamp(min=1)
        else:  # the x-th block of [g, nb) that is not in the window {qb-1, qb, qb+1}
            window = [qb[:, None] + d for d in (-1, 0, 1)]
            count = nb - g - sum(((w >= g) & (w < nb)).long() for w in window)
            pick = g + x % count.clamp(min=1)
            for w in window:  # ascending, so each skip moves past one excluded block
                pick = pick + ((pick >= w) & (w >= g)).long()
        return torch.where(count > 0, pick, -1)

    def pattern(self, i, j, length):
        """Window blocks, global rows/columns, and the random blocks of the query's block."""
        bs, g = self.opts.block_size, self.opts.num_global_blocks
        nb = -(-length // bs)
        qb, kb = (i // bs).clamp(max=nb - 1), j // bs
        keep = ((qb - kb).abs() <= 1) | (qb < g) | (kb < g)
        rand = self.random_blocks(torch.arange(nb, device=i.device), nb)[qb]  # (..., r)
        return keep | (rand == kb[..., None]).any(-1)

    def parts(self, q0, n, length, device):
        """Window + random blocks (non-global), global columns, global rows."""
        bs, g = self.opts.block_size, self.opts.num_global_blocks
        nb = -(-length // bs)
        block, blocks = block_part(q0, n, bs, device)
        near = [blocks - 1, blocks] + ([] if self.causal else [blocks + 1])
        rand = self.random_blocks(blocks, nb)
        for s in range(1, rand.shape[1]):  # a block drawn twice must be gathered once
            dup = (rand[:, s : s + 1] == rand[:, :s]).any(-1)
            rand[:, s] = torch.where(dup, -1, rand[:, s])
        kb = torch.cat([torch.stack(near, 1), rand], 1)
        keys = kb[:, :, None] * bs + torch.arange(bs, device=device)  # block -1 gives negative, empty slots
        parts = [Part(block.q, keys.flatten(1), only=lambda i, j: (i // bs >= g) & (j // bs >= g))]
        if g:
            cols = torch.arange(min(g * bs, length), device=device).expand(block.q.shape[0], -1)
            parts.append(Part(block.q, cols, only=lambda i, j: i // bs >= g))
            rows = _all_rows(q0, n, g * bs, length, device)
            if rows is not None:
                parts.append(rows)
        return parts
