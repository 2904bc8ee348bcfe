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
        if prev is None or segments is not None:
            prev = u.new_zeros(u.shape[0], u.shape[-1], k)
        full = torch.cat([prev.to(u.dtype).transpose(1, 2), u], dim=1)  # (batch, width-1+seq, ch)
        seg = F.pad(segments, (k, 0), value=-2) if segments is not None else None
        y = causal_taps(full, self.weight, self.bias, seg)
        return y, full[:, u.shape[1]:].transpose(1, 2) if segments is None else prev

    def step(self, u: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        """One token u (batch, ch) through the rolling window ``prev`` (batch, ch, width-1); returns (y, new prev)."""
        window = torch.cat([prev.to(u.dtype), u[..., None]], dim=-1)
        y = (window * self.weight[:, 0]).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y, window[..., 1:]


def causal_taps(full: Tensor, weight: Tensor, bias: Tensor | None, segments: Tensor | None = None) -> Tensor:
    """Depthwise causal conv outputs (batch, n, ch) of ``full`` (batch, width-1+n, ch): the width-1 inputs
    before the n outputs come first. ``weight`` (ch, 1, width), ``bias`` (ch,) or None; ``segments``
    (batch, width-1+n) ids of those rows (-2 for rows before the sequence): no tap crosses a segment."""
    k = weight.shape[-1] - 1
    n, w = full.shape[1] - k, weight[:, 0].to(full.dtype)
    # A width-w depthwise convolution is w shifted multiply-adds. Written so, it runs in the
    # (batch, seq, ch) layout with no transposes, its backward is elementwise too (oneDNN's
    # depthwise conv1d backward took a third of a Mamba layer's fwd+bwd time at 1K tokens), and
    # packed rows mask each shifted term so no input crosses a segment boundary.
    y = full.new_zeros(full.shape[0], n, full.shape[2]) if bias is None else bias.to(full.dtype).expand(
        full.shape[0], n, full.shape[2])
    for j in range(k + 1):  # tap j reads u_{t-(k-j)}
        term = full[:, j : j + n]
        if segments is not None and j < k:
            term = term * (segments[:, j : j + n] == segments[:, k:])[..., None].to(full.dtype)
        y = torch.addcmul(y, term, w[:, j])
    return y


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float = 1e-4) -> Tensor:
    """A bias (n,) whose softplus is a log-uniform step size in [dt_min, dt_max] (Mamba's initialisation)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def log_decay_rates(n: int, low: float = 1.0, high: float = 16.0) -> Tensor:
    """log A for n heads with A uniform in [low, high] (Mamba-2's initialisation, reused by Gated DeltaNet)."""
    return torch.empty(n).uniform_(low, high).log()


class _LinearScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t along dim 0, with a hand-written backward (the adjoint scan).

    Autograd through a Python loop of steps keeps one graph node per step and is slow; this keeps
    only ``a`` and the states, and the backward is the same recurrence run in reverse:
    g_t = dL/dh_t + a_{t+1} g_{t+1}, then dL/db_t = g_t, dL/da_t = g_t h_{t-1}, dL/dh_0 = a_1 g_1.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        states = torch.empty_like(b)
        h = h0
        for t in range(b.shape[0]):
            h = torch.addcmul(b[t], a[t], h, out=states[t])
        ctx.save_for_backward(a, states, h0)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, states, h0 = ctx.saved_tensors
        grad_states = grad_states.contiguous()
        g = torch.empty_like(grad_states)
        g[-1] = grad_states[-1]
        for t in range(g.shape[0] - 2, -1, -1):
            torch.addcmul(grad_states[t], a[t + 1], g[t + 1], out=g[t])
        grad_a = torch.empty_like(a)
        grad_a[0] = g[0] * h0
        torch.mul(g[1:], states[:-1], out=grad_a[1:])
        return grad_a, g, a[0] * g[0]


def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """Every state of h_t = a_t * h_{t-1} + b_t: a, b (seq, ...) time-major, h0 (...) -> (seq, ...).

    One fused step per token forward and backward, with no per-step graph; exact (no chunked
    re-association), so it is stable for any decay. The states are kept for backward: O(seq * state).
    """
    a, b = torch.broadcast_tensors(a, b)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), h0.dtype)
    return _LinearScan.apply(a.to(dtype).contiguous(), b.to(dtype).contiguous(), h0.to(dtype).expand(b.shape[1:]))
