"""Linears that execute in low precision: int weight-only (int8 matmul kernel, or packed int2..int4
dequantize-matmul) and W8A8 (int8 x int8 -> int32 matmul with per-token dynamic activation scales).

Weight-only, signed symmetric per channel (int8 in practice) casts its codes for the matmul and scales
the output per channel; other bit widths and groups keep codes (two 4-bit codes per byte at <= 4 bits)
and dequantize before the matmul. W8A8 ("LLM.int8()"/"SmoothQuant" style, without outlier decomposition)
quantizes each token's activations to int8 with its own absmax scale on the fly and runs
``torch._int_mm``; the int32 result is rescaled by the token and channel scales. Each module's
``spec()`` is the JSON a quantized checkpoint records to rebuild it (see ``compress/io.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.compress.formats import IntFormat
from efformer.compress.rtn import QuantizedWeight, rtn_quantize, weight_format

# Rows up to which W8A8 calls torch._int_mm. Measured on torch 2.13 CPU (busy 2-core machine, 1024x1024):
# _int_mm ~1 ms for one row but 57 ms for 16, against ~6 ms for the same exact product as float32 GEMMs
# (EXACT_K); _weight_int8pack_mm was slower still (10 ms for one row), so weight-only int8 casts its codes
# and scales the output instead, as torchao's CPU path does.
SMALL_M = 1
EXACT_K = 1024  # int8 x int8 products summed over <= 1040 terms stay below 2^24: exact in float32


def pack_nibbles(codes: Tensor) -> Tensor:
    """Unsigned 4-bit codes (out, in) -> bytes (out, ceil(in/2)): column 2j in the low nibble, 2j+1 in the high."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor, n_in: int) -> Tensor:
    """Inverse of ``pack_nibbles``: bytes (out, ceil(in/2)) -> codes (out, in) as uint8."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], -1).flatten(1)[:, :n_in]


class IntWeightLinear(nn.Module):
    """y = x W^T + b with W stored as integer codes and scales: (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, fmt: IntFormat, bias: bool, act_order: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        groups = in_features // fmt.group_size if fmt.granularity == "group" else 1
        self.packed = fmt.bits <= 4
        shape = (out_features, (in_features + 1) // 2) if self.packed else (out_features, in_features)
        dtype = torch.uint8 if self.packed or not fmt.signed else torch.int8
        self.register_buffer("qweight", torch.zeros(shape, dtype=dtype))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.int16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # signed symmetric codes per channel: y = (x W_q^T) * scale, so the codes are only cast, never rescaled
        self.scale_after = not self.packed and fmt.signed and fmt.symmetric and fmt.granularity == "channel"

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: Tensor | None) -> IntWeightLinear:
        """The module holding the codes and scales of ``q`` (out, in) and a float bias."""
        out_f, in_f = q.codes.shape
        m = cls(in_f, out_f, q.fmt, bias is not None, act_order=q.g_idx is not None)
        codes = q.codes - q.fmt.qmin if m.packed else q.codes
        m.qweight.copy_(pack_nibbles(codes) if m.packed else codes.to(m.qweight.dtype))
        m.scale.copy_(q.scale)
        m.zero.copy_(q.zero.to(torch.int16))
        if q.g_idx is not None:
            m.g_idx.copy_(q.g_idx)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def codes(self) -> Tensor:
        """The integer codes (out, in) as int32."""
        if self.packed:
            return unpack_nibbles(self.qweight, self.in_features).to(torch.int32) + self.fmt.qmin
        return self.qweight.to(torch.int32)

    def dequantize(self) -> Tensor:
        """The float weight (out, in) the codes stand for."""
        codes = self.codes().float()
        if self.fmt.granularity != "group":
            return (codes - self.zero) * self.scale
        if self.g_idx is not None:
            idx = self.g_idx.long()
            return (codes - self.zero[:, idx]) * self.scale[:, idx]
        g = codes.unflatten(1, (-1, self.fmt.group_size))  # contiguous groups: broadcast, no gather
        return ((g - self.zero[..., None]) * self.scale[..., None]).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        if self.scale_after:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale[:, 0].to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this module."""
        f = self.fmt
        return {"kind": "int_weight", "bits": f.bits, "group_size": f.group_size, "symmetric": f.symmetric,
                "bias": self.bias is not None, "act_order": self.g_idx is not None}

    def extra_repr(self) -> str:
        f = self.fmt
        return f"in={self.in_features}, out={self.out_features}, int{f.bits}, group={f.group_size}, sym={f.symmetric}"


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: x (m, in) -> (codes int8 (m, in), scales (m, 1))."""
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), s


def int8_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact int32 x_q w_q^T for int8 (m, k) and (n, k): ``torch._int_mm`` for few rows, else float32 GEMMs over
    chunks of k small enough that every partial sum is an exactly representable integer."""
    if xq.shape[0] <= SMALL_M or xq.device.type != "cpu":
        return torch._int_mm(xq, wq.t())
    acc = None
    for k0 in range(0, xq.shape[1], EXACT_K):
        part = (xq[:, k0:k0 + EXACT_K].float() @ wq[:, k0:k0 + EXACT_K].float().t()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations (per token, dynamic): (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Tensor | None) -> W8A8Linear:
        """Quantize a float weight (out, in) per channel, symmetric int8."""
        q = rtn_quantize(weight, weight_format(8, -1, True))
        m = cls(weight.shape[1], weight.shape[0], bias is not None)
        m.qweight.copy_(q.codes.to(torch.int8))
        m.scale.copy_(q.scale[:, 0])
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        x2 = x.reshape(-1, self.in_features).float()
        xq, xs = quantize_activations(x2)
        y = int8_matmul(xq, self.qweight).float() * xs * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this module."""
        return {"kind": "w8a8", "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8 per-token dynamic"


def build_module(spec: dict, in_features: int, out_features: int) -> nn.Module:
    """An empty module for a checkpoint's ``spec`` (filled by load_state_dict)."""
    if spec["kind"] == "w8a8":
        return W8A8Linear(in_features, out_features, spec["bias"])
    if spec["kind"] == "linear":  # a float linear that gained a bias (OS+ shift compensation)
        return nn.Linear(in_features, out_features, bias=spec["bias"])
    fmt = weight_format(spec["bits"], spec["group_size"], spec["symmetric"])
    return IntWeightLinear(in_features, out_features, fmt, spec["bias"], spec["act_order"])
