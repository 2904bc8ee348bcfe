"""Neighbourhood attention on a 2-D grid, plain and dilated.

Papers: "Neighborhood Attention Transformer" (Hassani et al., 2023) and "Dilated Neighborhood
Attention Transformer" (Hassani and Shi, 2022).

Each query attends to the ``kernel`` x ``kernel`` tokens nearest to it; at a border the
neighbourhood slides inwards so it keeps its size (unlike a zero-padded convolution). With
``dilation`` d the neighbourhood is taken among the tokens whose row and column share the query's
residue mod d (every d-th token), which widens the receptive field at the same cost. An axis with
fewer such tokens than the kernel gives all of them (NATTEN refuses that case; here a kernel that
covers the grid is full attention, which the tests check). Per-head relative position bias as in NAT.
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.vision_grid import GridMixer, dense_attention
from efformer.registry import register_mixer


class NeighborhoodOptions(MixerOptions):
    """Options of (dilated) neighbourhood attention."""

    kernel: int = pydantic.Field(7, ge=1, le=63, description="neighbourhood side in tokens (NAT: 7)")
    dilation: int = pydantic.Field(1, ge=1, le=64, description="DiNA's dilation: attend among every d-th token")
    position_bias: bool = pydantic.Field(True, description="learned relative position bias per head (NAT's rpb)")


def axis_neighbours(length: int, kernel: int, dilation: int, device=None) -> tuple[Tensor, Tensor]:
    """Per position of an axis, its neighbours (length, kernel) and which of them are real (bool).

    Position i belongs to the class of positions with its residue mod ``dilation``; within that class
    (m members, i at index a) the window of min(kernel, m) members starts at a - kernel // 2, slid to
    stay inside. Columns past the window's size repeat its first member and are marked False.
    """
    i = torch.arange(length, device=device)
    res, a = i % dilation, i // dilation
    m = (length - res + dilation - 1) // dilation  # members of i's residue class
    size = torch.clamp(m, max=kernel)
    start = torch.minimum((a - kernel // 2).clamp(min=0), m - size)
    j = torch.arange(kernel, device=device)
    valid = j[None, :] < size[:, None]
    idx = start[:, None] + torch.where(valid, j[None, :], 0)
    return res[:, None] + dilation * idx, valid


@register_mixer("neighborhood")
class NeighborhoodAttention(GridMixer):
    """Neighbourhood attention (NAT, DiNA): (b, h*w, d) on the model's grid -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="window-2d", paper="Neighborhood Attention Transformer",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=True,
        time="O(N k^2 d)", memory="O(N k^2)", forms=("reference", "fast"), grid=True,
    )
    Options = NeighborhoodOptions
    test_options = {"kernel": 3, "dilation": 2}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.build_qkv()
        k = self.opts.kernel
        if self.opts.position_bias:
            self.rpb = nn.Parameter(torch.randn(self.n_heads, 2 * k - 1, 2 * k - 1) * 0.02)

    def _bias(self, dr: Tensor, dc: Tensor) -> Tensor | None:
        """Bias (heads, *dr.shape) for offsets in class units (|offset| < kernel where attended)."""
        if not self.opts.position_bias:
            return None
        k = self.opts.kernel - 1
        return self.rpb[:, dr.clamp(-k, k) + k, dc.clamp(-k, k) + k]

    def forward_reference(self, x, *, mask, state, pos):
        """Dense attention with the neighbourhood of every query written as a (N, N) mask."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        k, dil = self.opts.kernel, self.opts.dilation
        (nr, vr), (nc, vc) = axis_neighbours(h, k, dil, x.device), axis_neighbours(w, k, dil, x.device)
        row_ok = torch.zeros(h, h, dtype=torch.bool, device=x.device)
        col_ok = torch.zeros(w, w, dtype=torch.bool, device=x.device)
        for i in range(h):
            row_ok[i, nr[i][vr[i]]] = True
        for i in range(w):
            col_ok[i, nc[i][vc[i]]] = True
        allowed = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(n, n)
        r, c = torch.arange(n, device=x.device) // w, torch.arange(n, device=x.device) % w
        bias = self._bias((r[None, :] - r[:, None]) // dil, (c[None, :] - c[:, None]) // dil)
        q, k_, v = self.heads_qkv(x)
        y = dense_attention(q, k_, v, allowed, bias, dropout=self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(y)), None

    def forward_fast(self, x, *, mask, state, pos):
        """Gather each query's kernel^2 keys and values, attend over them."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        k, dil = self.opts.kernel, self.opts.dilation
        (nr, vr), (nc, vc) = axis_neighbours(h, k, dil, x.device), axis_neighbours(w, k, dil, x.device)
        idx = (nr[:, None, :, None] * w + nc[None, :, None, :]).reshape(n, k * k)  # (N, k*k) key indices
        ok = (vr[:, None, :, None] & vc[None, :, None, :]).reshape(n, k * k)
        q, k_, v = self.heads_qkv(x)
        keys, vals = k_[:, :, idx], v[:, :, idx]  # (b, h, N, k*k, hd)
        scores = torch.einsum("bhnd,bhnkd->bhnk", q * self.head_dim ** -0.5, keys)
        r, c = torch.arange(n, device=x.device) // w, torch.arange(n, device=x.device) % w
        bias = self._bias((r[idx] - r[:, None]) // dil, (c[idx] - c[:, None]) // dil)
        if bias is not None:
            scores = scores + bias
        probs = F.dropout(scores.masked_fill(~ok, float("-inf")).softmax(-1), self.dropout if self.training else 0.0)
        y = torch.einsum("bhnk,bhnkd->bhnd", probs, vals)
        return self.out_proj(self.merge_heads(y)), None
