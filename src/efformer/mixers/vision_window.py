"""Window attention on a 2-D grid: Swin's (shifted) windows with a relative position bias.

Papers: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al., 2021);
the scaled cosine attention and log-spaced continuous position bias are from "Swin Transformer V2:
Scaling Up Capacity and Resolution" (Liu et al., 2022).

Each token attends within its ``window`` x ``window`` block; with ``shift`` the blocks move by that
many tokens (the cyclic shift of the paper, masked so no window mixes tokens the shift wrapped round).
A grid that windows do not divide is padded with zero tokens to the next multiple; with
``mask_padding`` (the default) they are masked out as keys, so the result is attention over the
real tokens of each window alone; ``mask_padding=False`` attends to them, as the released code does.
An axis no longer than the window gets one window of its length and no shift (as Swin does).
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.vision_grid import GridMixer, dense_attention, grid_coords
from efformer.registry import register_mixer


class SwinOptions(MixerOptions):
    """Options of Swin window attention."""

    window: int = pydantic.Field(7, ge=1, le=64, description="window side in tokens (Swin: 7)")
    shift: int = pydantic.Field(0, ge=0, description="shift of the windows in tokens: 0, or window // 2 on every "
                                                     "other layer (shifted-window attention); must be < window")
    position_bias: Literal["table", "continuous", "none"] = pydantic.Field(
        "table", description="relative position bias: a learned table per offset (V1), the log-spaced "
                             "continuous MLP (V2), or none")
    cosine: bool = pydantic.Field(False, description="V2's scaled cosine attention with a learned per-head scale")
    cpb_hidden: int = pydantic.Field(512, ge=1, le=4096, description="hidden width of V2's continuous bias MLP")
    mask_padding: bool = pydantic.Field(True, description="mask the zero tokens that pad the grid to window "
                                                          "multiples (False: attend to them, as the released code)")


@register_mixer("swin")
class SwinAttention(GridMixer):
    """Swin (shifted-)window attention: (b, h*w, d) on the model's grid -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="window-2d", paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=True,
        time="O(N w^2 d)", memory="O(N w^2)", forms=("reference", "fast"), grid=True,
    )
    Options = SwinOptions
    test_options = {"window": 3, "shift": 1, "cpb_hidden": 16}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.opts
        if o.shift >= o.window:
            raise ConfigError(f"{self.name}.shift", o.shift, f"must be < window={o.window} (Swin uses window // 2)")
        self.build_qkv()
        side = 2 * o.window - 1
        if o.position_bias == "table":
            self.bias_table = nn.Parameter(torch.randn(side * side, self.n_heads) * 0.02)
        elif o.position_bias == "continuous":
            self.cpb = nn.Sequential(nn.Linear(2, o.cpb_hidden), nn.ReLU(), nn.Linear(o.cpb_hidden, self.n_heads,
                                                                                       bias=False))
        if o.cosine:
            self.logit_scale = nn.Parameter(torch.full((self.n_heads, 1, 1), math.log(10.0)))

    # ---- the pattern ------------------------------------------------------------------------------
    def layout(self, h: int, w: int) -> tuple[int, int, int, int, int, int]:
        """(window rows, window cols, shift rows, shift cols, padded height, padded width) for an h x w grid."""
        win, s = self.opts.window, self.opts.shift
        wh, ww = min(win, h), min(win, w)
        sh, sw = (s if h > win else 0), (s if w > win else 0)
        return wh, ww, sh, sw, math.ceil(h / wh) * wh, math.ceil(w / ww) * ww

    def allowed_pairs(self, h: int, w: int, device=None) -> Tensor:
        """Bool (N, N) over the padded grid's tokens (row-major): query i may attend to key j.

        Same window after the cyclic shift, and on each axis both or neither wrapped round by it;
        with ``mask_padding``, a real query never sees a padding key.
        """
        wh, ww, sh, sw, hp, wp = self.layout(h, w)
        r, c = grid_coords(hp, wp, device)
        # rolling by -s puts original row r at (r - s) mod H; rows r < s are the ones that wrapped
        win_r, win_c = ((r - sh) % hp) // wh, ((c - sw) % wp) // ww
        wrap_r, wrap_c = r < sh, c < sw
        allowed = ((win_r[:, None] == win_r) & (win_c[:, None] == win_c)
                   & (wrap_r[:, None] == wrap_r) & (wrap_c[:, None] == wrap_c))
        if self.opts.mask_padding:
            real = (r < h) & (c < w)
            allowed &= real[None, :] | ~real[:, None]  # a padding query may see anything: its output is dropped
        return allowed

    def _table(self) -> Tensor | None:
        """Bias per relative offset and head ((2 window - 1)^2, heads), or None."""
        o = self.opts
        if o.position_bias == "table":
            return self.bias_table
        if o.position_bias == "none":
            return None
        side = torch.arange(-(o.window - 1), o.window, device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)
        rel = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
        rel = rel / max(o.window - 1, 1) * 8  # V2: offsets scaled to [-8, 8], then log-spaced
        rel = torch.sign(rel) * torch.log2(rel.abs() + 1.0) / math.log2(8)
        return 16 * torch.sigmoid(self.cpb(rel))

    def _bias(self, dr: Tensor, dc: Tensor) -> Tensor | None:
        """Bias (heads, *dr.shape) for row and column offsets (clamped into the table; clamped pairs are masked)."""
        table = self._table()
        if table is None:
            return None
        k = self.opts.window - 1
        idx = (dr.clamp(-k, k) + k) * (2 * k + 1) + dc.clamp(-k, k) + k
        return table[idx].movedim(-1, 0)

    def _scaled(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q scaled (by 1/sqrt(d), or by V2's learned scale after cosine normalisation) and k."""
        if not self.opts.cosine:
            return q * self.head_dim ** -0.5, k
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(k, dim=-1)

    def _padded(self, x: Tensor, h: int, w: int, hp: int, wp: int) -> Tensor:
        """(b, h*w, d) -> (b, hp, wp, d), zero tokens padding the bottom and right."""
        return F.pad(x.reshape(x.shape[0], h, w, -1), (0, 0, 0, wp - w, 0, hp - h))

    # ---- forms -------------------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Dense attention over the padded grid with the window pattern as a mask, then the real tokens."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        _, _, _, _, hp, wp = self.layout(h, w)
        tokens = self._padded(x, h, w, hp, wp).reshape(b, hp * wp, d)
        q, k, v = self.heads_qkv(tokens)
        q, k = self._scaled(q, k)
        r, c = grid_coords(hp, wp, x.device)
        bias = self._bias(r[:, None] - r, c[:, None] - c)
        y = dense_attention(q, k, v, self.allowed_pairs(h, w, x.device), bias, scale=1.0,
                            dropout=self.dropout if self.training else 0.0)
        real = ((r < h) & (c < w)).nonzero().flatten()
        return self.out_proj(self.merge_heads(y)[:, real]), None

    def forward_fast(self, x, *, mask, state, pos):
        """Cyclic shift, window partition, batched attention per window with its mask, and back."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        wh, ww, sh, sw, hp, wp = self.layout(h, w)
        nh, nw, t = hp // wh, wp // ww, wh * ww
        g = torch.roll(self._padded(x, h, w, hp, wp), (-sh, -sw), (1, 2))
        win = g.reshape(b, nh, wh, nw, ww, d).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, t, d)
        q, k, v = self.heads_qkv(win)
        q, k = self._scaled(q, k)
        # the pattern in window layout: rolled-frame position (i, j) of window (a, c) is original (i+s) mod H
        rr, cc = grid_coords(hp, wp, x.device)
        orig = ((rr + sh) % hp) * wp + (cc + sw) % wp  # original index of each rolled-frame position
        orig = orig.reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, t)
        o_r, o_c = orig // wp, orig % wp
        region = (o_r < sh).long() * 2 + (o_c < sw).long()  # which wrap-round region each token came from
        allowed = region[:, :, None] == region[:, None, :]  # (windows, t, t)
        if self.opts.mask_padding:
            real = (o_r < h) & (o_c < w)
            allowed &= real[:, None, :] | ~real[:, :, None]
        attn_mask = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        lr, lc = grid_coords(wh, ww, x.device)
        bias = self._bias(lr[:, None] - lr, lc[:, None] - lc)
        attn_mask = attn_mask[:, None] if bias is None else attn_mask[:, None] + bias.to(q.dtype)
        attn_mask = attn_mask.expand(b, -1, self.n_heads, -1, -1).reshape(b * nh * nw, self.n_heads, t, t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.merge_heads(y).reshape(b, nh, nw, wh, ww, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, d)
        y = torch.roll(y, (sh, sw), (1, 2))[:, :h, :w].reshape(b, n, d)
        return self.out_proj(y), None


class GridOptions(MixerOptions):
    """Options of MaxViT grid attention."""

    grid_size: int = pydantic.Field(7, ge=1, le=64, description="G: each token attends within a G x G grid of "
                                                                "tokens spread evenly over the image (MaxViT: 7)")


@register_mixer("maxvit_grid")
class GridAttention(GridMixer):
    """MaxViT grid attention: (b, h*w, d) on the model's grid -> (b, h*w, d), sparse global mixing.

    From "MaxViT: Multi-Axis Vision Transformer" (Tu et al., 2022). The grid is padded to multiples of
    G (padding keys masked) and cut into a G x G lattice of stride s = H / G: token (r, c) attends to
    the tokens (r', c') with r' = r and c' = c mod s, the dilated counterpart of window attention
    (MaxViT's block is ``swin`` window attention then this, each with its own residual). An axis
    shorter than G is one lattice row, so G covering the grid is full attention.
    """

    capabilities = Capabilities(
        family="window-2d", paper="MaxViT: Multi-Axis Vision Transformer",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=True,
        time="O(N G^2 d)", memory="O(N G^2)", forms=("reference", "fast"), grid=True,
    )
    Options = GridOptions
    test_options = {"grid_size": 2}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.build_qkv()

    def layout(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(lattice rows, lattice cols, row stride, col stride); padded sides are lattice size x stride."""
        gh, gw = min(self.opts.grid_size, h), min(self.opts.grid_size, w)
        return gh, gw, math.ceil(h / gh), math.ceil(w / gw)

    def forward_reference(self, x, *, mask, state, pos):
        """Dense attention over the padded grid: same residue of row and column mod the stride, real keys."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        gh, gw, sh, sw = self.layout(h, w)
        hp, wp = gh * sh, gw * sw
        tokens = F.pad(x.reshape(b, h, w, d), (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, d)
        r, c = grid_coords(hp, wp, x.device)
        real = (r < h) & (c < w)
        allowed = ((r[:, None] % sh == r % sh) & (c[:, None] % sw == c % sw)
                   & (real[None, :] | ~real[:, None]))
        q, k, v = self.heads_qkv(tokens)
        y = dense_attention(q, k, v, allowed, dropout=self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(y)[:, real.nonzero().flatten()]), None

    def forward_fast(self, x, *, mask, state, pos):
        """Pad, gather each lattice into one window of G x G tokens, fused attention with the padding mask."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        gh, gw, sh, sw = self.layout(h, w)
        hp, wp, t = gh * sh, gw * sw, gh * gw
        g = F.pad(x.reshape(b, h, w, d), (0, 0, 0, wp - w, 0, hp - h))
        win = g.reshape(b, gh, sh, gw, sw, d).permute(0, 2, 4, 1, 3, 5).reshape(b * sh * sw, t, d)
        r, c = grid_coords(hp, wp, x.device)
        real = ((r < h) & (c < w)).reshape(gh, sh, gw, sw).permute(1, 3, 0, 2).reshape(sh * sw, t)
        allowed = real[:, None, :] | ~real[:, :, None]  # (lattices, t, t)
        attn_mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        attn_mask = attn_mask[None, :, None].expand(b, -1, 1, -1, -1).reshape(b * sh * sw, 1, t, t)
        q, k, v = self.heads_qkv(win)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.merge_heads(y).reshape(b, sh, sw, gh, gw, d).permute(0, 3, 1, 4, 2, 5).reshape(b, hp, wp, d)
        return self.out_proj(y[:, :h, :w].reshape(b, n, d)), None


class CrossShapedOptions(MixerOptions):
    """Options of CSWin cross-shaped window attention."""

    stripe: int = pydantic.Field(2, ge=1, le=64, description="stripe width sw in tokens (CSWin: 1, 2, 7, 7 by stage)")
    lepe: bool = pydantic.Field(True, description="CSWin's locally-enhanced positional encoding: a depthwise 3x3 "
                                                  "conv of the values added to each branch's output")


@register_mixer("cswin")
class CrossShapedAttention(GridMixer):
    """CSWin cross-shaped window attention: (b, h*w, d) on the model's grid -> (b, h*w, d).

    From "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows" (Dong et
    al., 2022). Half the heads attend within horizontal stripes of ``stripe`` rows (all columns), the
    other half within vertical stripes of ``stripe`` columns, so each token sees a cross. A last stripe
    that the grid cuts short holds only the real rows (columns): padding keys are masked.
    """

    capabilities = Capabilities(
        family="window-2d", paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped "
                                  "Windows",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=True,
        time="O(N sw (h + w) d)", memory="O(N sw (h + w))", forms=("reference", "fast"), grid=True,
    )
    Options = CrossShapedOptions
    test_options = {"stripe": 2}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.n_heads % 2:
            raise ConfigError("n_heads", self.n_heads, "an even number for cswin (half the heads per stripe direction)")
        self.build_qkv()
        if self.opts.lepe:
            half = self.d_model // 2
            self.lepe = nn.ModuleList(nn.Conv2d(half, half, 3, padding=1, groups=half) for _ in range(2))

    def _lepe(self, v: Tensor, branch: int, h: int, w: int) -> Tensor:
        """LePE of values (b, heads/2, n, hd) on the grid, same shape (zero without LePE)."""
        if not self.opts.lepe:
            return torch.zeros_like(v)
        b, hh, n, hd = v.shape
        g = v.permute(0, 1, 3, 2).reshape(b, hh * hd, h, w)
        return self.lepe[branch](g).reshape(b, hh, hd, n).permute(0, 1, 3, 2)

    def forward_reference(self, x, *, mask, state, pos):
        """Dense attention per head with its stripe pattern as a mask, plus LePE."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        q, k, v = self.heads_qkv(x)
        r, c = grid_coords(h, w, x.device)
        s, half, outs = self.opts.stripe, self.n_heads // 2, []
        for branch, line in enumerate((r // s, c // s)):  # horizontal stripes, then vertical
            sl = slice(branch * half, (branch + 1) * half)
            y = dense_attention(q[:, sl], k[:, sl], v[:, sl], line[:, None] == line,
                                dropout=self.dropout if self.training else 0.0)
            outs.append(y + self._lepe(v[:, sl], branch, h, w))
        return self.out_proj(self.merge_heads(torch.cat(outs, 1))), None

    def forward_fast(self, x, *, mask, state, pos):
        """Pad to stripe multiples, attend within each stripe as a batch, masking the padding keys."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        q, k, v = self.heads_qkv(x)
        s, half, outs = self.opts.stripe, self.n_heads // 2, []
        for branch in range(2):
            sl = slice(branch * half, (branch + 1) * half)
            grids = [t[:, sl].reshape(b, half, h, w, -1) for t in (q, k, v)]
            if branch:  # vertical stripes are horizontal ones of the transposed grid
                grids = [g.transpose(2, 3) for g in grids]
            rows, cols = grids[0].shape[2:4]
            pad = (-rows) % s
            grids = [F.pad(g, (0, 0, 0, 0, 0, pad)) for g in grids]
            ns = (rows + pad) // s
            qs, ks, vs = (g.reshape(b, half, ns, s * cols, -1) for g in grids)
            real = (torch.arange(rows + pad, device=x.device) < rows).repeat_interleave(cols).reshape(ns, s * cols)
            attn_mask = torch.zeros(ns, 1, s * cols, dtype=x.dtype, device=x.device).masked_fill(
                ~real[:, None, :], float("-inf"))
            y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            y = y.reshape(b, half, rows + pad, cols, -1)[:, :, :rows]
            if branch:
                y = y.transpose(2, 3)
            outs.append(y.reshape(b, half, n, -1) + self._lepe(v[:, sl], branch, h, w))
        return self.out_proj(self.merge_heads(torch.cat(outs, 1))), None
