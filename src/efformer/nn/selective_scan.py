"""Mamba's selective scan (S6) in segments, with state checkpoints and a recomputing adjoint backward.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao, 2023), Algorithm 2:
h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t, y_t = h_t C_t, with a state of d x n numbers
per sequence. The paper's kernel never writes the (seq, d, n) decays, writes and states to main
memory: it keeps them in SRAM and recomputes them in backward. This is the same idea for CPU
caches: time is cut into segments of ``segment`` steps; only the state at each segment start is
kept, a segment's (segment, b, d, n) blocks are built, scanned and reduced while they fit in
cache, and the backward rebuilds them one segment at a time, latest first, running the adjoint
recurrence g_t = dL/dh_t + a_{t+1} g_{t+1}. Memory is O(seq d) for the inputs plus
O(seq / segment * d n) for the checkpoints, instead of O(seq d n).
"""

from __future__ import annotations

import torch
from torch import Tensor

SEGMENT = 64  # steps per segment: a (64, b, 512, 16) fp32 block is 2 MiB per sequence, within a CPU's L2/L3


def _blocks(u, delta, A, B, keep):
    """Decays and writes (k, b, d, n) of one segment (time-major inputs)."""
    decay = torch.exp(delta[..., None] * A)
    if keep is not None:
        decay = decay * keep[..., None, None]
    write = (delta * u)[..., None] * B[:, :, None]
    return decay, write


def _scan(decay: Tensor, write: Tensor, h: Tensor) -> Tensor:
    """States (k, b, d, n) of h_t = decay_t * h_{t-1} + write_t from h (b, d, n)."""
    states = torch.empty_like(write)
    for t in range(write.shape[0]):
        h = torch.addcmul(write[t], decay[t], h, out=states[t])
    return states


class _SelectiveScan(torch.autograd.Function):
    """Time-major u, delta (l, b, d); A (d, n); B, C (l, b, n); h0 (b, d, n); keep (l, b) or None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, keep, segment):
        seq = u.shape[0]
        y = u.new_empty(u.shape)
        starts = list(range(0, seq, segment))
        checkpoints = u.new_empty((len(starts), *h0.shape))
        h = h0
        for i, s in enumerate(starts):
            e = min(s + segment, seq)
            checkpoints[i] = h
            decay, write = _blocks(u[s:e], delta[s:e], A, B[s:e], None if keep is None else keep[s:e])
            states = _scan(decay, write, h)
            y[s:e] = torch.einsum("kbdn,kbn->kbd", states, C[s:e])
            h = states[-1].clone()
        if not starts:
            h = h0.clone()
        ctx.save_for_backward(u, delta, A, B, C, checkpoints, keep)
        ctx.segment = segment
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h):
        u, delta, A, B, C, checkpoints, keep = ctx.saved_tensors
        segment, seq = ctx.segment, u.shape[0]
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        carry = torch.zeros_like(checkpoints[0]) if grad_h is None else grad_h.clone()  # dL/dh at segment end
        for i in range(len(checkpoints) - 1, -1, -1):
            s = i * segment
            e = min(s + segment, seq)
            kp = None if keep is None else keep[s:e]
            decay, write = _blocks(u[s:e], delta[s:e], A, B[s:e], kp)
            states = _scan(decay, write, checkpoints[i])
            gy = grad_y[s:e]
            grad_C[s:e] = torch.einsum("kbdn,kbd->kbn", states, gy)
            g = gy[..., None] * C[s:e, :, None]  # dL/dh_t from y_t, (k, b, d, n)
            g[-1] += carry
            for t in range(g.shape[0] - 2, -1, -1):  # the adjoint recurrence, in place
                g[t].addcmul_(decay[t + 1], g[t + 1])
            carry = decay[0] * g[0]
            grad_decay_log = g * decay  # dL/d(delta A) through exp: g_t * h_{t-1} * decay_t
            grad_decay_log[0] *= checkpoints[i]
            grad_decay_log[1:] *= states[:-1]
            grad_A += torch.einsum("kbdn,kbd->dn", grad_decay_log, delta[s:e])
            grad_dlt = torch.einsum("kbdn,dn->kbd", grad_decay_log, A)
            grad_du = torch.einsum("kbdn,kbn->kbd", g, B[s:e])  # write = (delta u) B
            grad_B[s:e] = torch.einsum("kbdn,kbd->kbn", g, delta[s:e] * u[s:e])
            grad_u[s:e] = grad_du * delta[s:e]
            grad_delta[s:e] = grad_dlt + grad_du * u[s:e]
        return grad_u, grad_delta, grad_A, grad_B, grad_C, carry, None, None


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor,
                   reset: Tensor | None = None, segment: int = SEGMENT) -> tuple[Tensor, Tensor]:
    """S6 outputs and final state: u, delta (b, l, d); A (d, n); B, C (b, l, n); h0 (b, d, n) ->
    y (b, l, d), h (b, d, n). ``reset`` (b, l) bool: the decay is exactly 0 there (packed segment starts)."""
    dtype = torch.promote_types(u.dtype, h0.dtype)
    tm = [t.transpose(0, 1).to(dtype).contiguous() for t in (u, delta, B, C)]
    keep = None if reset is None else (~reset).transpose(0, 1).to(dtype).contiguous()
    y, h = _SelectiveScan.apply(tm[0], tm[1], A.to(dtype), tm[2], tm[3], h0.to(dtype).expand(u.shape[0], *A.shape),
                                keep, segment)
    return y.transpose(0, 1), h
