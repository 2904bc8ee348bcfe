"""Mamba's selective scan (S6) in segments, with state checkpoints and a recomputing adjoint backward.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao, 2023), Algorithm 2:
h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t, y_t = h_t C_t, with a state of d x n numbers
per sequence. The paper's kernel never writes the (seq, d, n) decays, writes and states to main
memory: it keeps them in SRAM and recomputes them in backward. This is the same idea for CPU
caches: time is cut into segments of ``segment`` steps; only the state at each segment start is
kept, a segment's (segment, b, n, d) blocks are built, scanned and reduced while they fit in
cache, and the backward rebuilds them one segment at a time, latest first, running the adjoint
recurrence g_t = dL/dh_t + a_{t+1} g_{t+1}. Memory is O(seq d) for the inputs plus
O(seq / segment * d n) for the checkpoints, instead of O(seq d n).

Why the blocks are laid out (n, d), channels innermost: every contraction over the state (y = C h,
dL/dB, dL/du) is then a (1 x n) @ (n x d) or (1 x d) @ (d x n) product, and the sums over n run
across rows, which CPU kernels vectorise; with n innermost those were matrix-vector products and
length-16 inner reductions, 3-8x slower (measured on (64, 1, 512, 16) blocks). The decays are
``exp2(delta A log2 e)``: the same numbers to fp32 rounding, and exp2 is about 2x faster than exp.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Steps per segment. A (K, b, 16, 512) fp32 block is K * 32 KiB per sequence; the backward holds three.
# Measured fwd+bwd of a d 256 Mamba layer at 4K tokens, one thread: see benchmarks/mamba_scan_memory.py.
SEGMENT = 64
LOG2E = math.log2(math.e)


def _decays(delta: Tensor, a2: Tensor, keep: Tensor | None) -> Tensor:
    """exp(delta A) (k, b, n, d) from delta (k, b, d) and a2 = A^T log2(e) (n, d); 0 where keep is 0."""
    decay = torch.mul(delta[:, :, None], a2).exp2_()
    if keep is not None:
        decay.mul_(keep[:, :, None, None])
    return decay


def _states(decay: Tensor, du: Tensor, B: Tensor, h: Tensor) -> Tensor:
    """States (k, b, n, d) of h_t = decay_t h_{t-1} + B_t (delta u)_t from h (b, n, d), built in the writes' buffer."""
    states = torch.mul(B[..., None], du[:, :, None])
    rows, decays = states.unbind(0), decay.unbind(0)
    rows[0].addcmul_(decays[0], h)
    for t in range(1, len(rows)):
        rows[t].addcmul_(decays[t], rows[t - 1])
    return states


class _SelectiveScan(torch.autograd.Function):
    """Time-major u, delta (l, b, d); A (d, n); B, C (l, b, n); h0 (b, d, n); keep (l, b) or None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, keep, segment):
        a2 = A.t().mul(LOG2E).contiguous()
        du = delta * u
        y = u.new_empty(u.shape)
        h = h0.transpose(-1, -2).clone(memory_format=torch.contiguous_format)  # (b, n, d), never a view of h0
        starts = range(0, u.shape[0], segment)
        checkpoints = u.new_empty((len(starts), *h.shape))
        for i, s in enumerate(starts):
            e = min(s + segment, u.shape[0])
            checkpoints[i] = h
            kp = None if keep is None else keep[s:e]
            states = _states(_decays(delta[s:e], a2, kp), du[s:e], B[s:e], h)
            y[s:e] = torch.matmul(C[s:e, :, None], states).squeeze(-2)
            h = states[-1].clone()  # not a view: the block is freed
        ctx.save_for_backward(u, delta, A, B, C, checkpoints, keep)
        ctx.segment = segment
        return y, h.transpose(-1, -2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h):
        u, delta, A, B, C, checkpoints, keep = ctx.saved_tensors
        segment, seq = ctx.segment, u.shape[0]
        at = A.t().contiguous()
        a2, du = at * LOG2E, delta * u
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_at = torch.zeros_like(at)
        carry = grad_h.transpose(-1, -2).contiguous()  # dL/dh at the segment's end, (b, n, d)
        for i in range(len(checkpoints) - 1, -1, -1):
            s = i * segment
            e = min(s + segment, seq)
            kp = None if keep is None else keep[s:e]
            decay = _decays(delta[s:e], a2, kp)
            states = _states(decay, du[s:e], B[s:e], checkpoints[i])
            gy = grad_y[s:e]
            grad_C[s:e] = torch.matmul(gy[:, :, None], states.transpose(-1, -2)).squeeze(-2)
            g = torch.mul(C[s:e, :, :, None], gy[:, :, None])  # dL/dh_t from y_t, (k, b, n, d)
            g[-1] += carry
            gs, decays = g.unbind(0), decay.unbind(0)
            for t in range(len(gs) - 2, -1, -1):  # the adjoint recurrence, in place
                gs[t].addcmul_(decays[t + 1], gs[t + 1])
            carry = decays[0] * gs[0]
            # dL/d(delta A)_t = g_t * decay_t * h_{t-1}, built in the decays' buffer.
            q = decay.mul_(g)
            q[1:].mul_(states[:-1])
            q[0].mul_(checkpoints[i])
            grad_du = torch.matmul(B[s:e, :, None], g).squeeze(-2)  # write = (delta u) B
            grad_B[s:e] = torch.matmul(du[s:e, :, None], g.transpose(-1, -2)).squeeze(-2)
            tmp = torch.mul(q, delta[s:e, :, None], out=states)  # the states are spent: reuse their buffer
            grad_at += tmp.sum((0, 1))
            grad_dlt = torch.mul(q, at, out=tmp).sum(2)
            grad_u[s:e] = grad_du * delta[s:e]
            grad_delta[s:e] = grad_dlt + grad_du * u[s:e]
        return grad_u, grad_delta, grad_at.t(), grad_B, grad_C, carry.transpose(-1, -2), None, None


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
