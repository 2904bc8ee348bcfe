"""MetaFormer's parameter-free token mixers: average pooling (PoolFormer) and identity.

Paper: "MetaFormer Is Actually What You Need for Vision" (Yu et al., 2022).

``pool``: y = AvgPool_k(x) - x on the grid, stride 1, the window cut at the border and averaged over
the tokens it holds (``count_include_pad=False``); the paper subtracts x because the block adds it
back through its residual. ``identity``: y = x, the MetaFormer baseline whose only token mixing is
none (the channel MLPs alone). Neither has weights, so neither has init roles to scale.
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.vision_grid import GridMixer
from efformer.registry import register_mixer


class PoolOptions(MixerOptions):
    """Options of PoolFormer's pooling mixer."""

    pool_size: int = pydantic.Field(3, ge=1, le=31, description="odd pooling window side (PoolFormer: 3)")

    @pydantic.field_validator("pool_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd, so the window is centred on its token")
        return v


class _Weightless(GridMixer):
    def init_roles(self) -> dict[str, list[Tensor]]:
        """No weights: nothing for DeepNorm to scale."""
        return {"value": [], "output": []}


@register_mixer("pool")
class PoolMixer(_Weightless):
    """PoolFormer pooling: AvgPool(x) - x on the model's grid, (b, h*w, d) -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="pooling-2d", paper="MetaFormer Is Actually What You Need for Vision",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=False,
        time="O(N k^2 d)", memory="O(N d)", forms=("reference", "fast"), grid=True,
    )
    Options = PoolOptions
    test_options = {"pool_size": 3}

    def forward_reference(self, x, *, mask, state, pos):
        """Sum the in-grid neighbours of each token by a loop over window offsets, divide by their count."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        g, r = x.reshape(b, h, w, d), self.opts.pool_size // 2
        total, count = torch.zeros_like(g), torch.zeros(h, w, 1, dtype=x.dtype, device=x.device)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
                xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
                total[:, yd, xd] += g[:, ys, xs]
                count[yd, xd] += 1
        return (total / count - g).reshape(b, n, d), None

    def forward_fast(self, x, *, mask, state, pos):
        """torch's average pooling with the border excluded from the count."""
        b, n, d = x.shape
        h, w = self.grid_of(pos, n)
        k = self.opts.pool_size
        g = x.transpose(1, 2).reshape(b, d, h, w)
        pooled = F.avg_pool2d(g, k, stride=1, padding=k // 2, count_include_pad=False)
        return (pooled - g).flatten(2).transpose(1, 2), None


@register_mixer("identity")
class IdentityMixer(_Weightless):
    """MetaFormer's identity mixer (IdentityFormer): y = x, (b, h*w, d) -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="pooling-2d", paper="MetaFormer Is Actually What You Need for Vision",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=False,
        time="O(N d)", memory="O(N d)", forms=("reference",), grid=True,
    )

    def forward_reference(self, x, *, mask, state, pos):
        """The tokens unchanged (the grid is checked so that misuse fails like the other 2-D mixers)."""
        self.grid_of(pos, x.shape[1])
        return x, None
