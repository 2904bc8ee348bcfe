"""Positional schemes. Three kinds, by where they act:

- ``embedding``: added to token embeddings (sinusoidal from "Attention Is All You Need"; learned).
- ``rotary``: rotate q and k by absolute position inside the mixer (RoPE from "RoFormer: Enhanced
  Transformer with Rotary Position Embedding"; xPos from "A Length-Extrapolatable Transformer").
- ``bias``: an additive score bias from query/key positions (ALiBi from "Train Short, Test Long:
  Attention with Linear Biases Enables Input Length Extrapolation"; T5 buckets from "Exploring the
  Limits of Transfer Learning with a Unified Text-to-Text Transformer"; FIRE from "Functional
  Interpolation for Relative Positions Improves Long Context Transformers").

All take absolute positions (batch, seq), so cached decoding with an offset is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.options import StrictModel, validate_options
from efformer.registry import POSITIONALS

Kind = Literal["none", "embedding", "rotary", "bias"]


@dataclass(frozen=True)
class Rotation:
    """Precomputed rotary tables for one forward: q and k cos/sin (b, 1, n, rot_dim/2), model dtype."""

    rot_dim: int
    q_cos: Tensor
    q_sin: Tensor
    k_cos: Tensor
    k_sin: Tensor

    def queries(self, q: Tensor) -> Tensor:
        """q (b, h, n, d) rotated (and scaled, for xPos)."""
        return self._apply(q, self.q_cos, self.q_sin)

    def keys(self, k: Tensor) -> Tensor:
        """k (b, h, n, d) rotated (and scaled down, for xPos)."""
        return self._apply(k, self.k_cos, self.k_sin)

    def _apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rot_dim
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)


@dataclass
class PositionalContext:
    """What a mixer needs to know about positions in one forward pass, computed once by the backbone.

    ``positions`` (b, n) are absolute; ``rotation`` holds rotary tables for q/k of these positions;
    ``bias`` is the score-bias scheme, whose tables are memoised per (query, key) positions pair, so
    the layers of a forward without a cache share one table. ``segments`` (b, n) integer ids mark a
    packed batch (several sequences laid end to end in one row, positions restarting per sequence):
    tokens mix only within their own segment; None = one sequence per row. ``grid`` (height, width) in
    tokens is set by image models: the sequence is that grid in row-major order, which 2-D mixers need.
    """

    positions: Tensor
    rotation: Rotation | None = None
    bias: nn.Module | None = None
    segments: Tensor | None = None
    grid: tuple[int, int] | None = None
    _bias_memo: dict = field(default_factory=dict, repr=False)

    def rotate_queries(self, q: Tensor) -> Tensor:
        """q (b, h, n, d), rotated when the model has a rotary scheme."""
        return q if self.rotation is None else self.rotation.queries(q)

    def rotate_keys(self, k: Tensor) -> Tensor:
        """k (b, h, n, d), rotated when the model has a rotary scheme."""
        return k if self.rotation is None else self.rotation.keys(k)

    def score_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """Additive bias (b, h, n, t) for query positions (b, n) and key positions (b, t), or None."""
        if self.bias is None:
            return None
        key = (id(q_pos), id(k_pos))
        hit = self._bias_memo.get(key)
        if hit is not None and hit[0] is q_pos and hit[1] is k_pos:
            return hit[2]
        table = self.bias(q_pos, k_pos)
        self._bias_memo[key] = (q_pos, k_pos, table)
        return table

    @property
    def kind(self) -> Kind:
        """Which in-mixer scheme this context carries: rotary, bias or none."""
        return "rotary" if self.rotation is not None else "bias" if self.bias is not None else "none"


def segment_positions(segments: Tensor) -> Tensor:
    """Positions (b, n) restarting at 0 where the segment id (b, n) changes along a packed row."""
    b, n = segments.shape
    idx = torch.arange(n, device=segments.device).expand(b, n)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(start, idx, 0).cummax(1).values


class PositionalScheme(nn.Module):
    """Base class; built with ``(d_model, n_heads, max_len, causal, options)``."""

    kind: ClassVar[Kind]
    Options: ClassVar[type[StrictModel]] = StrictModel

    def __init__(self, d_model: int, n_heads: int, max_len: int, causal: bool, options=None):
        super().__init__()
        self.opts = validate_options(self.Options, options, f"positional_options[{self.name}]")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.max_len, self.causal = max_len, causal

    def context(self, positions: Tensor, dtype: torch.dtype) -> PositionalContext:
        """The positional context of one forward pass (schemes acting inside mixers add their part)."""
        return PositionalContext(positions, bias=self if self.kind == "bias" else None)


@POSITIONALS.register("none")
class NoPositional(PositionalScheme):
    """NoPE: no positional information (causal masks alone carry order)."""

    kind = "none"


@POSITIONALS.register("sinusoidal")
class Sinusoidal(PositionalScheme):
    """Fixed sinusoids added to embeddings: positions (b, n) -> (b, n, d_model)."""

    kind = "embedding"

    def embed(self, positions: Tensor) -> Tensor:
        """Sinusoidal embedding of absolute positions (b, n) -> (b, n, d_model)."""
        half = self.d_model // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
        ang = positions[..., None].float() * freq
        emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
        return F.pad(emb, (0, self.d_model - 2 * half))


@POSITIONALS.register("learned")
class Learned(PositionalScheme):
    """Learned absolute position embeddings, one vector per position < max_len."""

    kind = "embedding"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.table = nn.Embedding(self.max_len, self.d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def embed(self, positions: Tensor) -> Tensor:
        """(b, n) -> (b, n, d_model); positions must be < max_len."""
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise ShapeError(
                f"position {int(positions.max())} >= max_len={self.max_len} of the learned positional "
                "table; raise max_len or use a relative scheme (rope, alibi)"
            )
        return self.table(positions)


class RopeOptions(StrictModel):
    """RoPE options."""

    base: float = pydantic.Field(10000.0, gt=1, description="theta base of the rotary frequencies")
    rotary_fraction: float = pydantic.Field(1.0, gt=0, le=1, description="partial rotary: rotate this share of dims")


@POSITIONALS.register("rope")
class Rope(PositionalScheme):
    """Rotary position embedding: rotates pairs of q/k dims by position-dependent angles."""

    kind = "rotary"
    Options = RopeOptions

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        rot = int(self.head_dim * self.opts.rotary_fraction) // 2 * 2
        if rot == 0:
            raise ShapeError(f"rotary_fraction={self.opts.rotary_fraction} leaves no dims to rotate")
        self.rot_dim = rot
        inv = 1.0 / self.opts.base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def rotation(self, positions: Tensor, dtype: torch.dtype) -> Rotation:
        """The rotation for absolute positions (b, n): cos/sin tables (b, 1, n, rot/2) in ``dtype``."""
        cos, sin = self._angles(positions, dtype)
        return Rotation(self.rot_dim, cos, sin, cos, sin)

    def _angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Angles in at least fp32 (fp64 for an fp64 model); the tables are then cast to the model's dtype.
        work = torch.promote_types(dtype, torch.float32)
        ang = positions[:, None, :, None].to(work) * self.inv_freq.to(work)
        return ang.cos(), ang.sin()

    def context(self, positions: Tensor, dtype: torch.dtype) -> PositionalContext:
        """Positions plus this rotation, for every layer of one forward pass."""
        return PositionalContext(positions, rotation=self.rotation(positions, dtype))

    def rotate_queries(self, q: Tensor, positions: Tensor) -> Tensor:
        """q (b, h, n, d) rotated by positions (b, n) (a convenience; models pass a context instead)."""
        return self.rotation(positions, q.dtype).queries(q)

    def rotate_keys(self, k: Tensor, positions: Tensor) -> Tensor:
        """k (b, h, n, d) rotated by positions (b, n)."""
        return self.rotation(positions, k.dtype).keys(k)


class XposOptions(RopeOptions):
    """xPos options: RoPE plus an exponential decay scale."""

    scale_base: float = pydantic.Field(512.0, gt=0, description="distance over which the xPos scale decays by zeta")


@POSITIONALS.register("xpos")
class XPos(Rope):
    """xPos: RoPE whose q is scaled by zeta^(n/scale_base) and k by zeta^(-m/scale_base)."""

    Options = XposOptions

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        r = self.rot_dim
        zeta = (torch.arange(0, r, 2, dtype=torch.float32) + 0.4 * r) / (1.4 * r)
        self.register_buffer("zeta", zeta, persistent=False)

    def rotation(self, positions: Tensor, dtype: torch.dtype) -> Rotation:
        """RoPE tables with q scaled by zeta^(n/scale_base) and k by zeta^(-m/scale_base)."""
        cos, sin = self._angles(positions, dtype)
        scale = self.zeta.to(cos.dtype) ** (positions[:, None, :, None].to(cos.dtype) / self.opts.scale_base)
        return Rotation(self.rot_dim, cos * scale, sin * scale, cos / scale, sin / scale)


@POSITIONALS.register("alibi")
class Alibi(PositionalScheme):
    """ALiBi: bias -slope_h * |i - j| with geometric per-head slopes; (b, n) x (b, t) -> (b, h, n, t)."""

    kind = "bias"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("slopes", self._slopes(self.n_heads), persistent=False)

    @staticmethod
    def _slopes(h: int) -> Tensor:
        p = 2 ** math.floor(math.log2(h))
        base = [2 ** (-8 * (i + 1) / p) for i in range(p)]
        extra = [2 ** (-4 * (2 * i + 1) / p) for i in range(h - p)]  # interleave for non-powers of 2
        return torch.tensor(base + extra)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Additive bias (b, h, n, t) from query positions (b, n) and key positions (b, t)."""
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()
        return -self.slopes[None, :, None, None] * dist[:, None]


class T5Options(StrictModel):
    """T5 bucketed relative bias options."""

    num_buckets: int = pydantic.Field(32, ge=2, description="relative-distance buckets (half a side if bidirectional)")
    max_distance: int = pydantic.Field(128, ge=2, description="distance where the log-spaced buckets end")


@POSITIONALS.register("t5")
class T5Bias(PositionalScheme):
    """T5 relative bias: a learned per-head scalar per log-spaced relative-distance bucket."""

    kind = "bias"
    Options = T5Options

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.table = nn.Embedding(self.opts.num_buckets, self.n_heads)
        nn.init.zeros_(self.table.weight)

    def bucket(self, rel: Tensor) -> Tensor:
        """Bucket index of relative positions ``key - query``."""
        nb, md = self.opts.num_buckets, self.opts.max_distance
        out = torch.zeros_like(rel)
        if self.causal:
            n = (-rel).clamp(min=0)
        else:
            nb //= 2
            out = out + (rel > 0).long() * nb
            n = rel.abs()
        exact = nb // 2
        large = exact + (
            torch.log(n.float().clamp(min=1) / exact) / math.log(md / exact) * (nb - exact)
        ).long()
        large = large.clamp(max=nb - 1)
        return out + torch.where(n < exact, n, large)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Additive bias (b, h, n, t)."""
        rel = k_pos[:, None, :] - q_pos[:, :, None]
        return self.table(self.bucket(rel)).permute(0, 3, 1, 2)


class FireOptions(StrictModel):
    """FIRE options."""

    hidden: int = pydantic.Field(32, gt=0, description="width of the per-head MLP f")
    init_c: float = pydantic.Field(0.1, gt=0, description="initial c of psi(x) = log(c x + 1)")
    init_threshold: float = pydantic.Field(512.0, gt=0, description="initial L of the max(L, i) normaliser")


@POSITIONALS.register("fire")
class Fire(PositionalScheme):
    """FIRE: bias f(psi(i-j) / psi(max(L, i))) with psi(x) = log(c x + 1), f a per-head MLP."""

    kind = "bias"
    Options = FireOptions

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.mlp = nn.Sequential(nn.Linear(1, self.opts.hidden), nn.ReLU(), nn.Linear(self.opts.hidden, self.n_heads))
        # c and L are learned through a softplus/abs so they stay positive.
        self.log_c = nn.Parameter(torch.tensor(math.log(self.opts.init_c)))
        self.threshold = nn.Parameter(torch.tensor(self.opts.init_threshold))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Additive bias (b, h, n, t)."""
        c = self.log_c.exp()
        rel = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # i - j
        psi_rel = rel.sign() * torch.log1p(c * rel.abs())  # signed, so bidirectional works too
        norm = torch.log1p(c * torch.maximum(self.threshold.abs(), q_pos.float() + 1))[:, :, None]
        return self.mlp((psi_rel / norm)[..., None]).permute(0, 3, 1, 2)


def build_positional(name: str, d_model: int, n_heads: int, max_len: int, causal: bool, options=None):
    """The positional scheme registered as ``name``."""
    return POSITIONALS.get(name)(d_model, n_heads, max_len, causal, options)
