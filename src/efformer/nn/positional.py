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
from functools import cached_property
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
    layout: str = "interleaved"  # which dims pair up; see RopeOptions.layout

    def queries(self, q: Tensor) -> Tensor:
        """q (b, h, n, d) rotated (and scaled, for xPos)."""
        cos, sin = self._tables[:2]
        return self._apply(q, cos, sin)

    def keys(self, k: Tensor) -> Tensor:
        """k (b, h, n, d) rotated (and scaled down, for xPos)."""
        cos, sin = self._tables[2:]
        return self._apply(k, cos, sin)

    @cached_property
    def _tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q cos, q signed sin, k cos, k signed sin (b, 1, n, rot_dim), laid out like the dims they multiply.

        Built once per forward and shared by every layer, so a rotation is x*cos + swap(x)*sin: one copy
        (the pair swap) and three elementwise ops instead of seven. The sign sits on sin, so each output
        is the same two products summed as in the textbook formula (a + (-b) == a - b in IEEE), bit for bit.
        """
        out = []
        for cos, sin in ((self.q_cos, self.q_sin), (self.k_cos, self.k_sin)):
            if self.layout == "half":  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
                out += [torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)]
            else:  # pairs (2i, 2i+1) -> (x1 cos - x2 sin, x2 cos + x1 sin)
                out += [cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)]
        return tuple(out)

    def _apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rot_dim
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        xr = x if r == x.shape[-1] else x[..., :r]
        if self.layout == "half":  # dim i pairs with dim i + r/2 (Hugging Face's rotate_half)
            swapped = torch.cat([xr[..., r // 2 :], xr[..., : r // 2]], dim=-1)
        else:
            swapped = xr.unflatten(-1, (r // 2, 2)).flip(-1).flatten(-2)
        out = xr * cos + swapped * sin
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
    scheme: nn.Module | None = field(default=None, repr=False)  # the scheme that made it (for :meth:`at`)
    _bias_memo: dict = field(default_factory=dict, repr=False)

    def at(self, positions: Tensor) -> PositionalContext:
        """The same scheme at other positions (b, n): a streaming KV cache re-positions its kept keys."""
        if self.rotation is None:
            return PositionalContext(positions, bias=self.bias)
        if self.scheme is None:
            raise ShapeError("this positional context was built without its scheme, so it cannot rotate other "
                             "positions; build it with scheme.context(positions, dtype)")
        return self.scheme.context(positions, self.rotation.q_cos.dtype)

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
    """Base class; built with ``(d_model, n_heads, max_len, causal, options)`` (``head_dim``: d_model // n_heads
    unless given)."""

    kind: ClassVar[Kind]
    Options: ClassVar[type[StrictModel]] = StrictModel

    def __init__(self, d_model: int, n_heads: int, max_len: int, causal: bool, options=None, *,
                 head_dim: int | None = None):
        super().__init__()
        self.opts = validate_options(self.Options, options, f"positional_options[{self.name}]")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim or d_model // n_heads
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
    """RoPE options, with the context-extension scalings of "Extending Context Window of Large Language
    Models via Positional Interpolation" (linear), NTK-aware "dynamic" scaling, Llama 3's band-wise
    scaling, and "YaRN: Efficient Context Window Extension of Large Language Models"."""

    base: float = pydantic.Field(10000.0, gt=1, description="theta base of the rotary frequencies")
    rotary_fraction: float = pydantic.Field(1.0, gt=0, le=1, description="partial rotary: rotate this share of dims")
    layout: Literal["interleaved", "half"] = pydantic.Field(
        "interleaved", description="dims rotated together: (2i, 2i+1) as in RoFormer, or (i, i + d/2) as in "
        "Hugging Face's Llama/Mistral/Qwen2 (rotate_half)")
    scaling: Literal["none", "linear", "dynamic", "llama3", "yarn"] = pydantic.Field(
        "none", description="context extension: linear divides every frequency by factor; dynamic raises the base "
        "once positions pass original_max_len; llama3 divides low frequencies only; yarn blends the two per band")
    factor: float = pydantic.Field(1.0, ge=1, description="context extension factor of the scaling")
    original_max_len: int | None = pydantic.Field(
        None, gt=0, description="pre-training context length the scaling extends (None: the model's max_len)")
    low_freq_factor: float = pydantic.Field(
        1.0, gt=0, description="llama3: wavelengths above original_max_len / low_freq_factor are divided by factor")
    high_freq_factor: float = pydantic.Field(
        4.0, gt=0, description="llama3: wavelengths below original_max_len / high_freq_factor are kept")
    beta_fast: float = pydantic.Field(32.0, gt=0, description="yarn: rotations above which dims extrapolate")
    beta_slow: float = pydantic.Field(1.0, gt=0, description="yarn: rotations below which dims interpolate")
    truncate: bool = pydantic.Field(True, description="yarn: round the blended band to whole dims")
    attention_factor: float | None = pydantic.Field(
        None, gt=0, description="yarn: scale of cos/sin, so of q.k by its square (None: 0.1 ln(factor) + 1)")

    @pydantic.model_validator(mode="after")
    def _bands(self) -> RopeOptions:
        if self.scaling == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")
        return self


def rope_frequencies(o: RopeOptions, dim: int, max_len: int, seq_len: int | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies (dim/2,) fp32 and the cos/sin scale of RoPE over ``dim`` dims.

    Computed with the same fp32 operations, in the same order, as Hugging Face's rope utilities, so
    angles ``position * inv_freq`` agree bit for bit (an ulp of inv_freq is 8e-3 rad at 128K).
    ``seq_len`` (dynamic scaling only) is the longest position + 1 of the forward.
    """
    orig = o.original_max_len or max_len
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base: float | Tensor = o.base
    if o.scaling == "dynamic" and seq_len is not None and seq_len > orig:
        grown = torch.tensor(seq_len)
        base = o.base * ((o.factor * grown / orig) - (o.factor - 1)) ** (dim / (dim - 2))
    if o.scaling == "yarn":
        return _yarn(o, dim, orig, exps)
    inv = 1.0 / (base ** exps)
    if o.scaling == "linear":
        inv = inv / o.factor
    elif o.scaling == "llama3":
        low_wavelen, high_wavelen = orig / o.low_freq_factor, orig / o.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / o.factor, inv)
        smooth = (orig / wavelen - o.low_freq_factor) / (o.high_freq_factor - o.low_freq_factor)
        blended = (1 - smooth) * scaled / o.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, blended, scaled)
    return inv, 1.0


def _yarn(o: RopeOptions, dim: int, orig: int, exps: Tensor) -> tuple[Tensor, float]:
    """YaRN: interpolate the low-frequency band, extrapolate the high one, ramp between (by rotations)."""
    scale = o.attention_factor
    if scale is None:
        scale = 0.1 * math.log(o.factor) + 1.0 if o.factor > 1 else 1.0

    def band_edge(rotations: float) -> float:  # the dim whose wavelength fits ``rotations`` times in orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(o.base))

    low, high = band_edge(o.beta_fast), band_edge(o.beta_slow)
    if o.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (unchanged frequency), 0: interpolate (divided by factor)
    pos_freqs = o.base ** exps
    inv = (1.0 / (o.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv, scale


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
        inv, self.cos_scale = rope_frequencies(self.opts, rot, self.max_len)
        self.register_buffer("inv_freq", inv, persistent=False)

    def rotation(self, positions: Tensor, dtype: torch.dtype) -> Rotation:
        """The rotation for absolute positions (b, n): cos/sin tables (b, 1, n, rot/2) in ``dtype``."""
        cos, sin = self._angles(positions, dtype)
        return Rotation(self.rot_dim, cos, sin, cos, sin, self.opts.layout)

    def _angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Angles in at least fp32 (fp64 for an fp64 model); the tables are then cast to the model's dtype.
        work = torch.promote_types(dtype, torch.float32)
        inv, scale = self.inv_freq, self.cos_scale
        if self.opts.scaling == "dynamic" and positions.numel():
            # the base grows with the longest position of this forward (a sync, for dynamic scaling only)
            inv, scale = rope_frequencies(self.opts, self.rot_dim, self.max_len, int(positions.max()) + 1)
            inv = inv.to(positions.device)
        ang = positions[:, None, :, None].to(work) * inv.to(work)
        if scale == 1.0:
            return ang.cos(), ang.sin()
        return ang.cos() * scale, ang.sin() * scale

    def context(self, positions: Tensor, dtype: torch.dtype) -> PositionalContext:
        """Positions plus this rotation, for every layer of one forward pass."""
        return PositionalContext(positions, rotation=self.rotation(positions, dtype), scheme=self)

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
        return Rotation(self.rot_dim, cos * scale, sin * scale, cos / scale, sin / scale, self.opts.layout)


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


def build_positional(name: str, d_model: int, n_heads: int, max_len: int, causal: bool, options=None,
                     head_dim: int | None = None):
    """The positional scheme registered as ``name`` (``head_dim`` only when it is not d_model // n_heads)."""
    extra = {} if head_dim is None else {"head_dim": head_dim}
    return POSITIONALS.get(name)(d_model, n_heads, max_len, causal, options, **extra)
