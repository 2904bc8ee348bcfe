"""Spatial-reduction attention on a 2-D grid (PVT) and its linear, pooled variant (PVT v2).

Papers: "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without
Convolutions" (Wang et al., 2021) and "PVT v2: Improved Baselines with Pyramid Vision Transformer"
(Wang et al., 2022).

Queries are all N tokens; keys and values come from a reduced grid. ``sra``: each ``ratio`` x
``ratio`` patch of the grid is flattened and projected to one token (the paper's Reshape then W^S;
a stride-``ratio`` convolution), so attention costs N^2 / ratio^2; a grid that the ratio does not
divide drops its last rows/columns from the keys, as the strided convolution does, and an axis
shorter than the ratio is reduced whole. ``linear_sra``: the grid is average-pooled to a fixed
``pool`` x ``pool`` (adaptive bins), then a 1x1 convolution, LayerNorm and GELU (the released code's
order), so the cost is linear in N. ``sra`` normalises its reduced tokens with a LayerNorm before the
key/value projection.
"""

from __future__ import annotations

import math

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.vision_grid import GridMixer, dense_attention
from efformer.registry import register_mixer


class SraOptions(MixerOptions):
    """Options of PVT spatial-reduction attention."""

    ratio: int = pydantic.Field(2, ge=1, le=64, description="reduction ratio R: keys are the grid reduced R x R "
                                                            "(PVT-tiny: 8, 4, 2, 1 by stage); 1 = full attention")
    norm_eps: float = pydantic.Field(1e-5, gt=0, description="epsilon of the LayerNorm of the reduced tokens "
                                                             "(PVT's checkpoints: 1e-6)")


class LinearSraOptions(MixerOptions):
    """Options of PVT v2's linear spatial-reduction attention."""

    pool: int = pydantic.Field(7, ge=1, le=64, description="keys are the grid average-pooled to pool x pool")
    norm_eps: float = pydantic.Field(1e-5, gt=0, description="epsilon of the LayerNorm of the reduced tokens")


class _Reduced(GridMixer):
    """Shared parts: the query projection, the key/value projection of reduced tokens, the output."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        d = self.d_model
        self.q_proj, self.kv_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=self.opts.norm_eps)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the key/value projection, and the output projection."""
        return {"value": [self.kv_proj.weight[self.d_model :]], "output": [self.out_proj.weight]}

    def _attend(self, x: Tensor, reduced: Tensor, exact_softmax: bool, normed: bool = False) -> Tensor:
        """Queries of x (b, n, d) over keys/values of the reduced tokens (b, m, d) -> (b, n, d)."""
        k, v = self.kv_proj(reduced if normed else self.norm(reduced)).chunk(2, -1)
        q, k, v = self.split_heads(self.q_proj(x)), self.split_heads(k), self.split_heads(v)
        p = self.dropout if self.training else 0.0
        if exact_softmax:
            y = dense_attention(q, k, v, None, dropout=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out_proj(self.merge_heads(y))


@register_mixer("sra")
class SpatialReductionAttention(_Reduced):
    """PVT spatial-reduction attention: (b, h*w, d) on the model's grid -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="reduction-2d", paper="Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction "
                                     "without Convolutions",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=False,
        time="O(N^2 d / R^2)", memory="O(N^2 / R^2)", forms=("reference", "fast"), grid=True,
    )
    Options = SraOptions
    test_options = {"ratio": 2}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        r, d = self.opts.ratio, self.d_model
        # W^S: a patch of r x r tokens (r*r*d numbers, row-major (dy, dx, channel)) -> one token
        self.reduce = nn.Linear(r * r * d, d) if r > 1 else None

    def _ratios(self, h: int, w: int) -> tuple[int, int]:
        r = self.opts.ratio
        return min(r, h), min(r, w)

    def _kernel(self, rh: int, rw: int) -> tuple[Tensor, Tensor]:
        """The reduction as a conv kernel (d, d, rh, rw) cut from W^S (a short axis uses its first rows)."""
        r, d = self.opts.ratio, self.d_model
        wt = self.reduce.weight.reshape(d, r, r, d)[:, :rh, :rw]  # (out, dy, dx, in)
        return wt.permute(0, 3, 1, 2), self.reduce.bias

    def forward_reference(self, x, *, mask, state, pos):
        """The paper's form: cut the grid into ratio x ratio patches, flatten each, project, attend."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        if self.reduce is None:
            return self._attend(x, x, True), None
        rh, rw = self._ratios(h, w)
        g = x.reshape(b, h, w, d)[:, : h // rh * rh, : w // rw * rw]
        patches = g.reshape(b, h // rh, rh, w // rw, rw, d).permute(0, 1, 3, 2, 4, 5)
        wt, bias = self._kernel(rh, rw)  # (out, in, dy, dx)
        flat_w = wt.permute(0, 2, 3, 1).reshape(d, rh * rw * d)
        reduced = patches.reshape(b, -1, rh * rw * d) @ flat_w.T + bias
        return self._attend(x, reduced, True), None

    def forward_fast(self, x, *, mask, state, pos):
        """The same reduction as a strided convolution, then fused attention."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        if self.reduce is None:
            return self._attend(x, x, False), None
        rh, rw = self._ratios(h, w)
        wt, bias = self._kernel(rh, rw)
        g = x.transpose(1, 2).reshape(b, d, h, w)
        reduced = F.conv2d(g, wt, bias, stride=(rh, rw)).flatten(2).transpose(1, 2)
        return self._attend(x, reduced, False), None


@register_mixer("linear_sra")
class LinearSpatialReductionAttention(_Reduced):
    """PVT v2 linear SRA: keys from the grid pooled to pool x pool; (b, h*w, d) -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="reduction-2d", paper="PVT v2: Improved Baselines with Pyramid Vision Transformer",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=False,
        time="O(N P^2 d)", memory="O(N P^2)", forms=("reference", "fast"), grid=True,
    )
    Options = LinearSraOptions
    test_options = {"pool": 2}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.proj = nn.Linear(self.d_model, self.d_model)  # PVT v2's 1x1 convolution

    def forward_reference(self, x, *, mask, state, pos):
        """Average each adaptive bin [floor(iH/P), ceil((i+1)H/P)) by a loop, then project and attend."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        g, p = x.reshape(b, h, w, d), self.opts.pool
        cells = []
        for i in range(p):
            r0, r1 = (i * h) // p, math.ceil((i + 1) * h / p)
            for j in range(p):
                c0, c1 = (j * w) // p, math.ceil((j + 1) * w / p)
                cells.append(g[:, r0:r1, c0:c1].mean((1, 2)))
        reduced = F.gelu(self.norm(self.proj(torch.stack(cells, 1))))
        return self._attend(x, reduced, True, normed=True), None

    def forward_fast(self, x, *, mask, state, pos):
        """Adaptive average pooling, the 1x1 projection and GELU, then fused attention."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        g = x.transpose(1, 2).reshape(b, d, h, w)
        pooled = F.adaptive_avg_pool2d(g, self.opts.pool).flatten(2).transpose(1, 2)
        return self._attend(x, F.gelu(self.norm(self.proj(pooled))), False, normed=True), None
