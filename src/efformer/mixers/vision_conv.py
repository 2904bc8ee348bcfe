"""Convolutional projections for attention (CvT).

Paper: "CvT: Introducing Convolutions to Vision Transformers" (Wu et al., 2021).

Queries, keys and values are each made by a depthwise ``kernel`` x ``kernel`` convolution on the
grid, a BatchNorm and a pointwise linear map; keys and values use stride ``kv_stride`` (CvT: 2), so
attention runs over N / s^2 keys. The convolutions pad by kernel // 2 with zeros, as in the paper.
With ``leading_tokens`` (CvT's class token in its last stage) the first tokens skip the convolutions
and join the grid's before the pointwise maps, as the released code does; ``scale="width"`` scales the
scores by d_model^-1/2 instead of head_dim^-1/2, which is also what the released code does.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.vision_grid import GridMixer, dense_attention
from efformer.registry import register_mixer


class ConvProjOptions(MixerOptions):
    """Options of CvT's convolutional projections."""

    kernel: int = pydantic.Field(3, ge=1, le=15, description="odd depthwise kernel side (CvT: 3)")
    kv_stride: int = pydantic.Field(2, ge=1, le=8, description="stride of the key/value convolutions (CvT: 2)")
    leading_tokens: int = pydantic.Field(0, ge=0, le=8, description="tokens before the grid (a class token) that "
                                                                    "skip the convolutions (CvT's last stage: 1)")
    scale: Literal["head", "width"] = pydantic.Field("head", description="scores times head_dim^-1/2, or "
                                                                         "d_model^-1/2 as CvT's released code")

    @pydantic.field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd, so the kernel is centred on its token")
        return v


class _ConvProjection(nn.Module):
    """Depthwise conv (stride s) -> BatchNorm -> linear: grid (b, h, w, d) -> tokens (b, h'*w', d)."""

    def __init__(self, d: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(d, d, kernel, stride=stride, padding=kernel // 2, groups=d, bias=False)
        self.norm = nn.BatchNorm2d(d)
        self.proj = nn.Linear(d, d)

    def forward(self, g: Tensor, loop: bool, lead: Tensor | None = None) -> Tensor:
        """``loop``: the depthwise convolution written as a sum over kernel offsets (the reference);
        ``lead`` (b, k, d) tokens go before the convolved grid's, unconvolved."""
        x = g.permute(0, 3, 1, 2)
        if loop:
            k, s = self.conv.kernel_size[0], self.conv.stride[0]
            h, w = x.shape[2:]
            xp = F.pad(x, (k // 2,) * 4)
            ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
            y = x.new_zeros(x.shape[0], x.shape[1], ho, wo)
            for dy in range(k):
                for dx in range(k):
                    y = y + xp[:, :, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s] * \
                        self.conv.weight[:, 0, dy, dx][None, :, None, None]
        else:
            y = self.conv(x)
        y = self.norm(y).flatten(2).transpose(1, 2)
        return self.proj(y if lead is None else torch.cat([lead, y], 1))


@register_mixer("cvt")
class ConvProjectionAttention(GridMixer):
    """CvT attention with convolutional q/k/v projections: (b, h*w, d) on the model's grid -> (b, h*w, d)."""

    capabilities = Capabilities(
        family="reduction-2d", paper="CvT: Introducing Convolutions to Vision Transformers",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=False,
        time="O(N^2 d / s^2)", memory="O(N^2 / s^2)", forms=("reference", "fast"), grid=True,
    )
    Options = ConvProjOptions
    test_options = {"kernel": 3, "kv_stride": 2}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        d, o = self.d_model, self.opts
        self.q_conv = _ConvProjection(d, o.kernel, 1)
        self.k_conv, self.v_conv = _ConvProjection(d, o.kernel, o.kv_stride), _ConvProjection(d, o.kernel, o.kv_stride)
        self.out_proj = nn.Linear(d, d)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The value projection's pointwise map, and the output projection."""
        return {"value": [self.v_conv.proj.weight], "output": [self.out_proj.weight]}

    def _qkv(self, x: Tensor, pos, loop: bool) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        k = self.opts.leading_tokens
        h, w = self.grid_of(pos, n - k)
        g = x[:, k:].reshape(b, h, w, d)
        return tuple(self.split_heads(p(g, loop, x[:, :k])) for p in (self.q_conv, self.k_conv, self.v_conv))

    def _scale(self) -> float:
        return (self.d_model if self.opts.scale == "width" else self.head_dim) ** -0.5

    def forward_reference(self, x, *, mask, state, pos):
        """Convolutions as sums over kernel offsets, then plain softmax attention."""
        q, k, v = self._qkv(x, pos, True)
        y = dense_attention(q, k, v, None, scale=self._scale(), dropout=self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(y)), None

    def forward_fast(self, x, *, mask, state, pos):
        """torch's grouped convolutions and fused attention."""
        q, k, v = self._qkv(x, pos, False)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           scale=self._scale())
        return self.out_proj(self.merge_heads(y)), None


class MBConvOptions(MixerOptions):
    """Options of MaxViT's MBConv."""

    expand: float = pydantic.Field(4.0, gt=0, le=8, description="width of the inverted bottleneck as a multiple "
                                                                "of d_model (MaxViT: 4)")
    kernel: int = pydantic.Field(3, ge=1, le=15, description="odd depthwise kernel side (MaxViT: 3)")
    se_ratio: float = pydantic.Field(0.25, ge=0, le=1, description="squeeze-excitation width as a fraction of "
                                                                   "d_model (MaxViT: 0.25); 0 = none")

    @pydantic.field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd, so the kernel is centred on its token")
        return v


@register_mixer("mbconv")
class MBConv(GridMixer):
    """MaxViT's MBConv as a token mixer: (b, h*w, d) on the model's grid -> (b, h*w, d).

    From "MaxViT: Multi-Axis Vision Transformer" (Tu et al., 2022), the inverted bottleneck of
    MobileNetV2 / EfficientNet: 1x1 expansion, BatchNorm, GELU; depthwise k x k conv, BatchNorm,
    GELU; squeeze-excitation (global mean -> SiLU -> sigmoid gate per channel); 1x1 projection. The
    block's residual and pre-norm wrap it; a MaxViT block is then ``mbconv``, ``swin`` windows and
    ``maxvit_grid`` blocks in a row (here each with its own FFN, which MaxViT's MBConv does not have).
    """

    capabilities = Capabilities(
        family="conv-2d", paper="MaxViT: Multi-Axis Vision Transformer",
        causal=False, bidirectional=True, padding_mask=False, decode=False, exact=True,
        time="O(N k^2 e d)", memory="O(N e d)", forms=("reference", "fast"), grid=True,
    )
    Options = MBConvOptions
    test_options = {"expand": 2.0, "kernel": 3}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        d, o = self.d_model, self.opts
        hidden = max(1, round(o.expand * d))
        self.up, self.down = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d)
        self.norm_up, self.norm_dw = nn.BatchNorm1d(hidden), nn.BatchNorm1d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, o.kernel, padding=o.kernel // 2, groups=hidden, bias=False)
        squeeze = round(o.se_ratio * d)
        self.se = nn.Sequential(nn.Linear(hidden, squeeze), nn.SiLU(), nn.Linear(squeeze, hidden)) if squeeze else None

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The expansion (the values of this mixer), and the projection."""
        return {"value": [self.up.weight], "output": [self.down.weight]}

    @staticmethod
    def _bn(norm: nn.BatchNorm1d, t: Tensor) -> Tensor:
        return norm(t.transpose(1, 2)).transpose(1, 2)  # (b, n, c): statistics per channel

    def _mix(self, x: Tensor, pos, loop: bool) -> Tensor:
        b, n, _ = x.shape
        h, w = self.grid_of(pos, n)
        t = F.gelu(self._bn(self.norm_up, self.up(x)))  # (b, n, hidden)
        g = t.transpose(1, 2).reshape(b, -1, h, w)
        if loop:  # the depthwise convolution as a sum over kernel offsets
            k = self.opts.kernel
            gp = F.pad(g, (k // 2,) * 4)
            g = sum(gp[:, :, dy:dy + h, dx:dx + w] * self.dw.weight[:, 0, dy, dx][None, :, None, None]
                    for dy in range(k) for dx in range(k))
        else:
            g = self.dw(g)
        t = F.gelu(self._bn(self.norm_dw, g.flatten(2).transpose(1, 2)))
        if self.se is not None:
            t = t * torch.sigmoid(self.se(t.mean(1, keepdim=True)))
        return self.down(t)

    def forward_reference(self, x, *, mask, state, pos):
        """The depthwise convolution written as a loop over kernel offsets."""
        return self._mix(x, pos, True), None

    def forward_fast(self, x, *, mask, state, pos):
        """torch's grouped convolution."""
        return self._mix(x, pos, False), None
