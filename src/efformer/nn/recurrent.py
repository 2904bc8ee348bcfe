"""Parts recurrent mixers share: a short causal depthwise convolution that continues across decode
calls (Mamba, Mamba-2, DeltaNet, Gated DeltaNet), Mamba's step-size initialisation and Mamba-2's
decay-rate initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConv(nn.Conv1d):
    """Depthwise causal convolution over (batch, seq, channels), carrying the last ``width - 1`` inputs.

    A subclass of ``nn.Conv1d`` so its parameters keep the names ``weight`` and ``bias`` in saved models.
    """

    def __init__(self, channels: int, width: int, bias: bool = True):
        super().__init__(channels, channels, width, groups=channels, bias=bias)

    def forward(self, u: Tensor, prev: Tensor | None = None, segments: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u (batch, seq, ch) continuing after ``prev`` (batch, ch, width-1; None: zeros, a fresh sequence).

        Returns the output (batch, seq, ch) and the new ``prev`` (the last width-1 inputs). With packed
        ``segments`` (batch, seq) (and no ``prev``) a token sees only earlier inputs of its own segment.
        """
        k = self.kernel_size[0] - 1
        if segments is not None:
            return self._packed(u, segments), u.new_zeros(u.shape[0], u.shape[-1], k)
        if prev is None:
            prev = u.new_zeros(u.shape[0], u.shape[-1], k)
        full = torch.cat([prev.to(u.dtype), u.transpose(1, 2)], dim=-1)
        y = F.conv1d(full, self.weight, self.bias, groups=self.groups)
        return y.transpose(1, 2), full[..., full.shape[-1] - k :]

    def _packed(self, u: Tensor, segments: Tensor) -> Tensor:
        """The convolution as ``width`` shifted, segment-masked products (no input crosses a boundary)."""
        n, width = u.shape[1], self.kernel_size[0]
        y = torch.zeros_like(u) if self.bias is None else self.bias.to(u.dtype).expand_as(u).clone()
        for j in range(width):  # u_{t-j} meets weight tap width-1-j (conv1d is a cross-correlation)
            shifted = F.pad(u, (0, 0, j, 0))[:, :n]
            same = F.pad(segments, (j, 0), value=-2)[:, :n] == segments
            y = y + shifted * same[..., None].to(u.dtype) * self.weight[:, 0, width - 1 - j].to(u.dtype)
        return y

    def step(self, u: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        """One token u (batch, ch) through the rolling window ``prev`` (batch, ch, width-1); returns (y, new prev)."""
        window = torch.cat([prev.to(u.dtype), u[..., None]], dim=-1)
        y = (window * self.weight[:, 0]).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y, window[..., 1:]


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float = 1e-4) -> Tensor:
    """A bias (n,) whose softplus is a log-uniform step size in [dt_min, dt_max] (Mamba's initialisation)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def log_decay_rates(n: int, low: float = 1.0, high: float = 16.0) -> Tensor:
    """log A for n heads with A uniform in [low, high] (Mamba-2's initialisation, reused by Gated DeltaNet)."""
    return torch.empty(n).uniform_(low, high).log()
