"""Manhattan self-attention (MaSA): softmax attention weighted by a 2-D spatial decay (RMT).

Paper: "RMT: Retentive Networks Meet Vision Transformers" (Fan et al., 2024).

Full form: ``(softmax(q k^T / sqrt(d)) * D) v`` with ``D[n, m] = gamma_h ** (|r_n - r_m| + |c_n - c_m|)``,
the Manhattan distance on the grid, one decay per head (the weights are not renormalised after the
decay, as the paper writes it). ``decomposed=True`` is the paper's cheaper variant for early stages:
attention along each column with the 1-D decay of rows, then along each row with the decay of columns,
O(N (h + w)) instead of O(N^2). The per-head decays follow RetNet's schedule ``1 - 2^(-5 - h')``
over the heads; ``gamma`` fixes one decay for all heads (gamma = 1 is plain softmax attention).
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor

from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.vision_grid import GridMixer, grid_coords
from efformer.registry import register_mixer


class ManhattanOptions(MixerOptions):
    """Options of RMT's Manhattan self-attention."""

    decomposed: bool = pydantic.Field(False, description="attend along columns then along rows (the paper's "
                                                         "early-stage variant) instead of over the whole grid")
    gamma: float | None = pydantic.Field(None, gt=0, le=1, description="one decay for every head; None = "
                                                                       "RetNet's per-head schedule")


@register_mixer("manhattan")
class ManhattanAttention(GridMixer):
    """RMT Manhattan self-attention: (b, h*w, d) on the model's grid -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="retention-2d", paper="RMT: Retentive Networks Meet Vision Transformers",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=False,
        time="O(N^2 d); decomposed O(N (h + w) d)", memory="O(N^2); decomposed O(N (h + w))",
        forms=("reference", "fast"), grid=True,
    )
    Options = ManhattanOptions
    test_options = {"decomposed": True}  # the full form is checked in tests/mixers/test_vision_retention.py

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.build_qkv()
        if self.opts.gamma is not None:
            gammas = torch.full((self.n_heads,), self.opts.gamma)
        else:
            gammas = 1 - 2.0 ** (-5 - torch.arange(self.n_heads, dtype=torch.float32) * 4 / max(self.n_heads - 1, 1))
        self.register_buffer("log_gamma", gammas.log(), persistent=False)

    def _decay(self, dist: Tensor, dtype) -> Tensor:
        """gamma_h ** dist for integer distances: (heads, *dist.shape)."""
        return (self.log_gamma.view(-1, *([1] * dist.dim())) * dist).exp().to(dtype)

    def forward_reference(self, x, *, mask, state, pos):
        """The definition pair by pair: softmax weights times the decay of each pair's grid distance."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        q, k, v = self.heads_qkv(x)
        r, c = grid_coords(h, w, x.device)
        if not self.opts.decomposed:
            dist = (r[:, None] - r).abs() + (c[:, None] - c).abs()
            probs = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(-1)
            return self.out_proj(self.merge_heads((probs * self._decay(dist, x.dtype)) @ v)), None
        # decomposed (the paper's Attn_H (Attn_W V)): two masked dense passes, within rows then within columns
        out, scores = v, (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        for same, dist in ((r[:, None] == r, (c[:, None] - c).abs()), (c[:, None] == c, (r[:, None] - r).abs())):
            out = (scores.masked_fill(~same, float("-inf")).softmax(-1) * self._decay(dist, x.dtype)) @ out
        return self.out_proj(self.merge_heads(out)), None

    def forward_fast(self, x, *, mask, state, pos):
        """Full form: the decay built from separable row and column factors; decomposed: batched per line."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        q, k, v = self.heads_qkv(x)
        rr, cc = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        dr, dc = self._decay((rr[:, None] - rr).abs(), x.dtype), self._decay((cc[:, None] - cc).abs(), x.dtype)
        scale = self.head_dim ** -0.5
        if not self.opts.decomposed:
            decay = (dr[:, :, None, :, None] * dc[:, None, :, None, :]).reshape(-1, n, n)  # gamma^(|dr|+|dc|)
            probs = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)
            return self.out_proj(self.merge_heads((probs * decay) @ v)), None
        H = self.n_heads
        grid = lambda t: t.reshape(b, H, h, w, -1)  # noqa: E731
        qg, kg, vg = grid(q), grid(k), grid(v)
        # within each row (over columns, decay by column distance), then within each column (over rows)
        s = torch.einsum("bHrid,bHrjd->bHrij", qg, kg) * scale
        out = torch.einsum("bHrij,bHrjd->bHrid", s.softmax(-1) * dc[None, :, None], vg)
        s = torch.einsum("bHicd,bHjcd->bHcij", qg, kg) * scale
        out = torch.einsum("bHcij,bHjcd->bHicd", s.softmax(-1) * dr[None, :, None], out)
        return self.out_proj(self.merge_heads(out.reshape(b, H, n, -1))), None
