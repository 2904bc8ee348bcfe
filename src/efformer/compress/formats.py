"""Number formats for post-training quantization: integers with scales, minifloats with block scales, log2.

* Integers (int2..int8, signed or unsigned) with one scale (and zero point) per tensor, per output
  channel / token (the last dim reduced), or per group of ``g`` consecutive entries of the last dim;
  symmetric (zero point fixed) or asymmetric (min/max affine, 0 always exactly representable).
* Minifloats FP8 E4M3 (the "fn" variant: no infinities, max 448), FP8 E5M2 (IEEE-like, max 57344) and
  FP4 E2M1 (max 6), from "FP8 Formats for Deep Learning" (Micikevicius et al., 2022) and the OCP
  Microscaling (MX) v1.0 spec; block scales as MX (one power-of-two E8M0 scale per 32 values) or as
  NVFP4 (one FP8 E4M3 scale per 16 values under a per-tensor fp32 scale).
* A log2 quantizer for post-softmax probabilities in [0, 1] ("FQ-ViT: Post-Training Quantization for
  Fully Quantized Vision Transformer", Lin et al., 2022): code q = round(-log2 p), value 2^-q.

Every format has an exact ``encode`` (values -> integer codes) and ``decode`` (codes -> values);
``fake_quant`` is ``decode(encode(x))`` computed directly. Rounding is round-half-to-even everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from efformer.errors import ConfigError, UnknownNameError

Granularity = Literal["tensor", "channel", "token", "group"]


# ---- integers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntFormat:
    """An integer grid: ``bits`` wide, signed or unsigned, symmetric or asymmetric, with its scale layout."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int = -1  # only with granularity "group"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError("bits", self.bits, "an integer from 2 to 16 (2..8 for stored integers)")
        if self.granularity not in ("tensor", "channel", "token", "group"):
            raise ConfigError("granularity", self.granularity, "one of 'tensor', 'channel', 'token', 'group'")
        if (self.granularity == "group") != (self.group_size > 0):
            raise ConfigError("group_size", self.group_size,
                              "a positive group size with granularity 'group', and -1 otherwise")

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def with_grain(self, granularity: Granularity, group_size: int = -1) -> IntFormat:
        """The same grid with another scale layout."""
        return IntFormat(self.bits, self.signed, self.symmetric, granularity, group_size)


def _grouped(x: Tensor, fmt: IntFormat) -> Tensor:
    """``x`` (..., d) viewed as (..., n_groups, group) for the reduction that defines the scale."""
    d = x.shape[-1]
    if fmt.granularity == "tensor":
        return x.reshape(1, -1)
    if fmt.granularity in ("channel", "token"):
        return x.unsqueeze(-2)
    if d % fmt.group_size:
        raise ConfigError("group_size", fmt.group_size, f"must divide the width {d} (use a divisor of {d}, or -1)")
    return x.unflatten(-1, (d // fmt.group_size, fmt.group_size))


def int_qparams(x: Tensor, fmt: IntFormat) -> tuple[Tensor, Tensor]:
    """(scale, zero) of ``x`` (..., d) for ``fmt``: shapes (..., n_groups), (1, 1) per tensor; zero is an integer."""
    g = _grouped(x.detach(), fmt)
    lo = g.amin(-1).clamp(max=0)  # 0 stays on the grid (padding, ReLU outputs, pruned weights)
    hi = g.amax(-1).clamp(min=0)
    if fmt.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / fmt.qmax if fmt.signed else amax / ((fmt.qmax - 1) // 2)
        zero = torch.zeros_like(scale) if fmt.signed else torch.full_like(scale, (fmt.qmax + 1) // 2)
    else:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = (fmt.qmin - torch.round(lo / safe)).clamp(fmt.qmin, fmt.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    return scale, zero


CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4  # the GPTQ reference quantizer's search settings


def int_qparams_clipped(x: Tensor, fmt: IntFormat) -> tuple[Tensor, Tensor]:
    """Like ``int_qparams`` but each group's range shrunk by the factor p in {1, 0.99, ..., 0.21} that
    minimises sum |fake_quant(x) - x|^2.4 over the group (clipping the extremes to refine the step).

    The search of the GPTQ authors' quantizer (its ``mse`` option). Shrinking min and max by p scales the
    step by p and leaves the zero point's code unchanged, so each candidate is (p * scale, zero); p = 1 is
    a candidate, hence never worse than min/max on that error."""
    scale, zero = int_qparams(x, fmt)
    g = _grouped(x.detach(), fmt)
    best_err = torch.full(scale.shape, math.inf, dtype=g.dtype)
    best_scale = scale.clone()
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        s = scale * (1 - i / CLIP_GRID)
        q = (torch.round(g / s[..., None]) + zero[..., None]).clamp(fmt.qmin, fmt.qmax)
        err = ((q - zero[..., None]) * s[..., None] - g).abs().pow(CLIP_NORM).sum(-1).reshape(scale.shape)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return best_scale, zero


def _expand(p: Tensor, x: Tensor, fmt: IntFormat) -> Tensor:
    """Per-group parameters (..., n_groups) broadcast to ``x`` (..., d)."""
    if fmt.granularity == "tensor":
        return p.reshape(())
    if fmt.granularity in ("channel", "token"):
        return p
    return p.repeat_interleave(fmt.group_size, dim=-1)


def int_encode(x: Tensor, scale: Tensor, zero: Tensor, fmt: IntFormat) -> Tensor:
    """Codes clamp(round(x / scale) + zero) in [qmin, qmax] (int32, shape of ``x``)."""
    s, z = _expand(scale, x, fmt), _expand(zero, x, fmt)
    return (torch.round(x / s) + z).clamp(fmt.qmin, fmt.qmax).to(torch.int32)


def int_decode(q: Tensor, scale: Tensor, zero: Tensor, fmt: IntFormat) -> Tensor:
    """Values (q - zero) * scale (float, shape of ``q``)."""
    s, z = _expand(scale, q, fmt), _expand(zero, q, fmt)
    return (q.to(s.dtype) - z) * s


def int_fake_quant(x: Tensor, fmt: IntFormat) -> Tensor:
    """``x`` rounded to ``fmt``'s grid with scales computed from ``x`` itself (RTN)."""
    scale, zero = int_qparams(x, fmt)
    return int_decode(int_encode(x, scale, zero, fmt), scale, zero, fmt).to(x.dtype)


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, fmt: IntFormat) -> tuple[Tensor, Tensor]:
    """One weight column (out,) with its row scales/zeros (out,): (codes, values); GPTQ's inner step."""
    q = (torch.round(w / scale) + zero).clamp(fmt.qmin, fmt.qmax)
    return q.to(torch.int32), (q - zero) * scale


# ---- minifloats ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa minifloat without infinities used as values (saturating fake-quant)."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float
    # E5M2 keeps IEEE's all-ones exponent for inf/NaN; E4M3fn keeps only S.1111.111 for NaN; E2M1 has none.
    ieee_specials: bool

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value (the MX spec's emax_elem)."""
        return int(math.floor(math.log2(self.max_value)))

    def decode(self, codes: Tensor) -> Tensor:
        """Value of each code (integer tensor of ``bits``-wide codes) by the format's definition; NaN/inf codes
        come back as NaN/inf."""
        c = codes.to(torch.int64)
        sign = torch.where((c >> (self.bits - 1)) & 1 == 1, -1.0, 1.0).double()
        e = (c >> self.man_bits) & ((1 << self.exp_bits) - 1)
        m = (c & ((1 << self.man_bits) - 1)).double()
        frac = m / (1 << self.man_bits)
        normal = torch.exp2((e - self.bias).double()) * (1 + frac)
        sub = 2.0 ** self.min_normal_exp * frac
        v = sign * torch.where(e == 0, sub, normal)
        top = (1 << self.exp_bits) - 1
        if self.ieee_specials:
            v = torch.where((e == top) & (m == 0), sign * math.inf, v)
            v = torch.where((e == top) & (m != 0), math.nan, v)
        elif self.name == "fp8_e4m3":
            v = torch.where((e == top) & (m == (1 << self.man_bits) - 1), math.nan, v)
        return v.float()

    def finite_codes(self) -> Tensor:
        """Every code of a finite value, non-negative ones first in increasing order, then the negative ones."""
        pos = torch.arange(1 << (self.bits - 1))
        pos = pos[torch.isfinite(self.decode(pos))]
        return torch.cat([pos, pos | (1 << (self.bits - 1))])

    def round(self, x: Tensor) -> Tensor:
        """``x`` rounded to the nearest value of the format (ties to even), saturating at ±max_value."""
        a = x.abs().double().clamp(max=self.max_value)
        e = torch.floor(torch.log2(a.clamp(min=2.0 ** (self.min_normal_exp - 1))))
        e = e.clamp(min=self.min_normal_exp)  # subnormals share the smallest normal exponent's step
        step = torch.exp2(e - self.man_bits)
        r = (torch.round(a / step) * step).clamp(max=self.max_value)
        return torch.copysign(r, x.double()).to(x.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Codes (uint8 tensor) of ``x`` rounded to the format; -0 keeps its sign bit."""
        r = self.round(x).double()
        pos = torch.arange(1 << (self.bits - 1))
        vals = self.decode(pos).double()
        n_finite = int(torch.isfinite(vals).sum())
        mag = torch.searchsorted(vals[:n_finite].contiguous(), r.abs().contiguous())
        neg = torch.signbit(r).to(torch.int64) << (self.bits - 1)
        return (mag | neg).to(torch.uint8)


FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, 448.0, ieee_specials=False)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15, 57344.0, ieee_specials=True)
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, 6.0, ieee_specials=False)
FLOAT_FORMATS = {f.name: f for f in (FP8_E4M3, FP8_E5M2, FP4_E2M1)}
FloatScaling = Literal["tensor", "channel", "mx", "nv"]
MX_BLOCK, NV_BLOCK = 32, 16


def mx_scale(x: Tensor, fmt: FloatFormat, block: int = MX_BLOCK) -> Tensor:
    """MX shared scales (..., d/block): 2^(floor(log2 amax) - emax_elem), clamped to E8M0's range."""
    amax = x.unflatten(-1, (-1, block)).abs().amax(-1).double()
    e = torch.floor(torch.log2(amax.clamp(min=2.0 ** -127))) - fmt.emax
    return torch.exp2(e.clamp(-127, 127)).to(x.dtype)


def nv_scales(x: Tensor, block: int = NV_BLOCK) -> tuple[Tensor, Tensor]:
    """NVFP4 scales: a per-tensor fp32 scale and per-block FP8 E4M3 scales (..., d/block) under it."""
    amax_t = x.abs().amax().float()
    tensor_scale = torch.where(amax_t > 0, amax_t / (FP8_E4M3.max_value * FP4_E2M1.max_value), 1.0)
    amax = x.unflatten(-1, (-1, block)).abs().amax(-1).float()
    block_scale = FP8_E4M3.round(amax / FP4_E2M1.max_value / tensor_scale)
    block_scale = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    return tensor_scale, block_scale


def float_scale(x: Tensor, fmt: FloatFormat, scaling: FloatScaling) -> Tensor:
    """The scale of ``x`` (..., d) under ``scaling``, broadcast to ``x``'s shape: x ≈ scale * fmt(x / scale)."""
    d = x.shape[-1]
    if scaling in ("mx", "nv"):
        block = MX_BLOCK if scaling == "mx" else NV_BLOCK
        if d % block:
            raise ConfigError("scaling", scaling, f"{scaling} blocks of {block} must divide the width {d}")
        if scaling == "mx":
            return mx_scale(x, fmt, block).repeat_interleave(block, -1)
        t, b = nv_scales(x, block)
        return (b * t).to(x.dtype).repeat_interleave(block, -1)
    if scaling not in ("tensor", "channel"):
        raise ConfigError("scaling", scaling, "one of 'tensor', 'channel', 'mx', 'nv'")
    amax = x.abs().amax() if scaling == "tensor" else x.abs().amax(-1, keepdim=True)
    s = amax / fmt.max_value
    return torch.where(s > 0, s, torch.ones_like(s)).expand_as(x)


def float_fake_quant(x: Tensor, fmt: FloatFormat, scaling: FloatScaling = "channel") -> Tensor:
    """``x`` (..., d) quantized to ``fmt`` with ``scaling`` and dequantized."""
    s = float_scale(x.detach(), fmt, scaling)
    return fmt.round(x / s) * s


# ---- log2 ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Log2Format:
    """Probabilities in [0, 1] as powers of two: code q in [0, 2^bits - 1] stands for 2^-q."""

    bits: int = 4

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def encode(self, p: Tensor) -> Tensor:
        """Codes clamp(round(-log2 p), 0, qmax) (int32); p = 0 gets the largest code."""
        return torch.round(-torch.log2(p.clamp(min=0))).clamp(0, self.qmax).to(torch.int32)

    def decode(self, q: Tensor) -> Tensor:
        """Values 2^-q."""
        return torch.exp2(-q.float())

    def fake_quant(self, p: Tensor) -> Tensor:
        """``p`` rounded to the nearest power of two in log space."""
        return self.decode(self.encode(p)).to(p.dtype)


def float_format(name: str) -> FloatFormat:
    """The minifloat format called ``name`` (fp8_e4m3, fp8_e5m2, fp4_e2m1)."""
    if name not in FLOAT_FORMATS:
        raise UnknownNameError("float format", name, FLOAT_FORMATS)
    return FLOAT_FORMATS[name]
