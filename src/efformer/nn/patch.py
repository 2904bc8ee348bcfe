"""Image inputs as tokens: patch embeddings and stems, patch merging, and 2-D positions.

Papers: "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale" (ViT: linear
patch embedding, learned positions); "Escaping the Big Data Paradigm with Compact Transformers"
(CCT) and "CvT: Introducing Convolutions to Vision Transformers" (convolutional stems); "Swin
Transformer" (patch merging); "Masked Autoencoders Are Scalable Vision Learners" (fixed 2-D sin-cos);
"Rotary Position Embedding for Vision Transformer" (2-D axial RoPE); "Conditional Positional
Encodings for Vision Transformers" (CPE: a depthwise convolution generates positions, PEG); "PVT v2:
Improved Baselines with Pyramid Vision Transformer" (Mix-FFN: a depthwise convolution inside the FFN).

Grids are (batch, height, width, channels) here; models flatten them row-major into tokens.
"""

from __future__ import annotations

import math

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.nn.positional import PositionalContext, Rotation
from efformer.options import StrictModel
from efformer.registry import FFNS


class PatchEmbed(nn.Module):
    """Images (b, c, H, W) -> patch tokens (b, H/p, W/p, d) by a linear map of each p x p patch, or a conv stem.

    ``stem="linear"`` is ViT's (a stride-p convolution: one linear map per patch; with ``kernel`` > p
    and ``padding``, PVT v2's and PoolFormer's overlapping patches); ``stem="conv"``
    is a CCT/CvT-style stack of log2(p) stride-2 3x3 convolutions with GELU between them.
    """

    def __init__(self, in_channels: int, d_model: int, patch_size: int, stem: str = "linear", *,
                 kernel: int | None = None, padding: int = 0, norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        # Swin / PVT normalise the patch tokens; PVT v2 / PoolFormer overlap patches (kernel > stride, padded)
        self.norm = nn.LayerNorm(d_model, eps=eps) if norm else None
        if stem == "linear":
            self.proj = nn.Conv2d(in_channels, d_model, kernel or patch_size, stride=patch_size, padding=padding)
        elif stem == "conv":
            steps = int(math.log2(patch_size))
            if 2**steps != patch_size:
                raise ConfigError("patch_size", patch_size, "a power of 2 for stem='conv' (one stride-2 conv per "
                                  "halving); use stem='linear' for other patch sizes")
            layers: list[nn.Module] = [nn.Conv2d(in_channels, d_model, 1)] if steps == 0 else []  # patch 1
            c = in_channels
            for i in range(steps):  # widths double up to d_model, as CCT's tokenizer
                out = d_model if i == steps - 1 else max(d_model // 2 ** (steps - 1 - i), 8)
                layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GELU()] if i < steps - 1 else \
                          [nn.Conv2d(c, out, 3, stride=2, padding=1)]
                c = out
            self.proj = nn.Sequential(*layers)
        else:
            raise ConfigError("stem", stem, "'linear' or 'conv'")

    def forward(self, images: Tensor) -> Tensor:
        """(b, c, H, W) float images -> (b, H/p, W/p, d); a ShapeError names a wrong channel count or size."""
        check_images(images, self.in_channels, self.patch_size)
        g = self.proj(images).permute(0, 2, 3, 1)
        return g if self.norm is None else self.norm(g)


def check_images(images, channels: int, multiple: int) -> None:
    """A ShapeError unless ``images`` is a float (b, channels, H, W) tensor with H, W multiples of ``multiple``."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ShapeError(f"images must be a (batch, channels, height, width) tensor, got {got}")
    if not images.is_floating_point():
        raise ShapeError(f"images must be floating point (scale uint8 pixels to [0, 1]), got {images.dtype}")
    b, c, h, w = images.shape
    if c != channels:
        raise ShapeError(f"images have {c} channels but the model takes in_channels={channels}; convert them "
                         f"(e.g. repeat a grey channel) or build the model with in_channels={c}")
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ShapeError(f"image size {h}x{w} is not a multiple of the patch size {multiple}; resize or pad the "
                         f"images to multiples of {multiple}, or pick a patch size that divides them")


class PatchMerge(nn.Module):
    """Between stages: (b, h, w, d) -> (b, ceil(h/2), ceil(w/2), d_out); odd sides are zero-padded first.

    ``kind="patch_merge"`` is Swin's (concatenate each 2x2 block, LayerNorm, linear 4d -> d_out);
    ``"patch_merge_v2"`` is Swin V2's (the linear map, then LayerNorm of d_out); ``kind="conv"`` is
    PVT's and MetaFormer's (a stride-2 ``kernel`` x ``kernel`` convolution padded by (kernel - 1) // 2:
    2 for PVT, 3 for PVT v2 and PoolFormer; then LayerNorm unless ``norm=False``, as PoolFormer).
    ``pre_norm``: a LayerNorm of the stage's output first (PVT v2 ends each stage with one).
    """

    def __init__(self, d_in: int, d_out: int, kind: str = "patch_merge", *, kernel: int = 2, norm: bool = True,
                 pre_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.kind, self.kernel = kind, kernel
        self.pre_norm = nn.LayerNorm(d_in, eps=eps) if pre_norm else None
        if kind in ("patch_merge", "patch_merge_v2"):
            self.norm = nn.LayerNorm(4 * d_in if kind == "patch_merge" else d_out, eps=eps)
            self.proj = nn.Linear(4 * d_in, d_out, bias=False)
        elif kind == "conv":
            self.proj = nn.Conv2d(d_in, d_out, kernel, stride=2, padding=(kernel - 1) // 2)
            self.norm = nn.LayerNorm(d_out, eps=eps) if norm else nn.Identity()
        else:
            raise ConfigError("merge", kind, "'patch_merge', 'patch_merge_v2' or 'conv'")

    def forward(self, g: Tensor) -> Tensor:
        """(b, h, w, d) -> (b, ceil(h/2), ceil(w/2), d_out)."""
        if self.pre_norm is not None:
            g = self.pre_norm(g)
        h, w = g.shape[1:3]
        if self.kind != "conv" or self.kernel % 2 == 0:  # an odd padded kernel already gives ceil(h / 2)
            g = F.pad(g, (0, 0, 0, w % 2, 0, h % 2))
        if self.kind == "conv":
            return self.norm(self.proj(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        # Swin's order of the four: (0, 0), (1, 0), (0, 1), (1, 1)
        g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
        return self.proj(self.norm(g)) if self.kind == "patch_merge" else self.norm(self.proj(g))


class PoolingMerge(nn.Module):
    """PiT's pooling layer between stages: grid (b, h, w, d) -> (b, ceil(h/2), ceil(w/2), d_out) by a stride-2
    3x3 depthwise convolution (groups = d, so d_out / d filters per input channel, padding 1), and the class
    tokens (b, k, d) -> (b, k, d_out) by a linear map (:meth:`lead`): they have no place on the grid."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        if d_out % d_in:
            raise ConfigError("stages", f"d_model {d_in} -> {d_out}", "merge='pit' widens each stage by a whole "
                              "factor (depthwise: groups = input channels); make each d_model a multiple of the last")
        self.proj = nn.Conv2d(d_in, d_out, 3, stride=2, padding=1, groups=d_in)
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, g: Tensor) -> Tensor:
        """(b, h, w, d) -> (b, ceil(h/2), ceil(w/2), d_out); kernel 3, padding 1 gives the ceiling on odd sides."""
        return self.proj(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def lead(self, tokens: Tensor) -> Tensor:
        """Class (and distillation) tokens (b, k, d) -> (b, k, d_out)."""
        return self.fc(tokens)


def sincos_2d(h: int, w: int, d: int, device=None) -> Tensor:
    """Fixed 2-D sin-cos positions (h*w, d): half the channels encode the row, half the column (d % 4 == 0)."""
    if d % 4:
        raise ConfigError("d_model", d, "a multiple of 4 for positional='sincos2d' (sin and cos of rows and columns)")
    quarter = d // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ar, ac = r.reshape(-1, 1).float() * freq, c.reshape(-1, 1).float() * freq
    return torch.cat([ar.sin(), ar.cos(), ac.sin(), ac.cos()], -1)


def resize_table(table: Tensor, h0: int, w0: int, h: int, w: int) -> Tensor:
    """A learned (h0*w0, d) position table bicubically resized to (h*w, d) (ViT's fine-tuning at a new size)."""
    if (h0, w0) == (h, w):
        return table
    grid = table.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(h * w, -1)


def rope_2d(h: int, w: int, n_extra: int, head_dim: int, b: int, dtype: torch.dtype, device=None,
            base: float = 100.0) -> Rotation:
    """Axial 2-D RoPE for ``n_extra`` leading tokens plus an h x w grid: half the rotated pairs turn with the
    row, half with the column. Grid tokens sit at (row + 1, col + 1); extra (class) tokens at (0, 0)."""
    rot = head_dim // 4 * 4
    if rot == 0:
        raise ConfigError("n_heads", head_dim, "head_dim >= 4 for positional='rope2d' (two pairs per axis)")
    inv = 1.0 / base ** (torch.arange(0, rot // 2, 2, device=device, dtype=torch.float64) / (rot // 2))
    r, c = torch.meshgrid(torch.arange(1, h + 1, device=device), torch.arange(1, w + 1, device=device), indexing="ij")
    rows = torch.cat([torch.zeros(n_extra, device=device, dtype=torch.long), r.reshape(-1)])
    cols = torch.cat([torch.zeros(n_extra, device=device, dtype=torch.long), c.reshape(-1)])
    work = torch.promote_types(dtype, torch.float32)
    ang = torch.cat([rows[:, None] * inv, cols[:, None] * inv], -1).to(work)  # (n, rot/2)
    cos, sin = ang.cos()[None, None].expand(b, 1, -1, -1), ang.sin()[None, None].expand(b, 1, -1, -1)
    return Rotation(rot, cos, sin, cos, sin)


class ConditionalPosition(nn.Module):
    """CPE's position generator (PEG): grid tokens (b, h, w, d) + depthwise k x k conv of them."""

    def __init__(self, d_model: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)

    def forward(self, g: Tensor) -> Tensor:
        """(b, h, w, d) -> (b, h, w, d)."""
        return g + self.conv(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MixFFNOptions(StrictModel):
    """Options of PVT v2's Mix-FFN."""

    relu: bool = pydantic.Field(False, description="a ReLU after the first linear map (PVT v2's linear variant)")


@FFNS.register("mixffn")
class MixFFN(nn.Module):
    """PVT v2's Mix-FFN on an image model's grid: down(act(dwconv3x3(up(x)))), (b, h*w, d) -> (b, h*w, d)."""

    Options = MixFFNOptions
    takes_positions = True  # the block passes its PositionalContext: the convolution needs the grid
    needs_grid = True  # so a text model refuses it

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, *, options=None, causal: bool = False):
        super().__init__()
        hidden = max(1, round(mult * d_model))
        self.relu = MixFFNOptions.model_validate(options or {}).relu
        self.up, self.down = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, positions: PositionalContext | None = None) -> Tensor:
        """(b, h*w, d) -> (b, h*w, d); a ShapeError without the grid."""
        grid = None if positions is None else positions.grid
        b, n, _ = x.shape
        if grid is None or grid[0] * grid[1] != n:
            raise ShapeError(f"mixffn convolves the token grid, but got {n} tokens with grid {grid}; use it in an "
                             "image model with patch tokens only (pooling='mean')")
        h = self.up(x)
        h = F.relu(h) if self.relu else h
        h = self.dwconv(h.transpose(1, 2).reshape(b, -1, *grid)).flatten(2).transpose(1, 2)
        return self.down(self.drop(F.gelu(h)))
