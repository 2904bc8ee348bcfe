"""Chunked linear attention with one log-gate per head and step: a hand-written, lean backward for CPU.

The recurrence of "Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et
al., 2023) with a scalar gate, S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, covers simple
GLA, retention ("Retentive Network", Sun et al., 2023; a fixed gate) and causal linear attention
(gate 1). Forward and backward run over groups of chunks; only q, k, v, g and the state entering
each *group* are kept for backward, which rebuilds a group's chunk states and (C, C) decay blocks
and applies the gradient formulas directly (no autograd graph is recorded or replayed), so a
layer's training memory is its inputs and gradients plus one group's blocks.

The log-gate gradient uses the scale symmetry of the recurrence: raising g_tau by eps multiplies
q_t by e^eps for t >= tau, k_s by e^-eps for s >= tau, and the state leaving the chunk by e^eps.
So within a chunk, dL/dg_tau = sum_{t >= tau} (q_t . dq_t - k_t . dk_t) + <S_out, dS_out>: a
reverse cumulative sum over the chunk's C steps only (no long cancelling sums).
Shapes: chunked q, k (B, H, N, C, K), v (B, H, N, C, V), g (B, H, N, C, 1); states (B, H, K, V).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _blocks(q: Tensor, k: Tensor, g: Tensor):
    """Cumulative log-gate b (.., C, 1), e^b, e^(b_C - b), the chunk decay e^(b_C) (.., 1, 1) and the
    causal (C, C) decay e^(b_t - b_s) for s <= t, else 0; every exponent taken is <= 0."""
    c = q.shape[-2]
    b = g.cumsum(-2)
    last = b[..., -1:, :]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (b - b.transpose(-1, -2)).masked_fill_(~causal, float("-inf")).exp_()
    return b.exp(), (last - b).exp(), last.exp(), decay


def _states(s: Tensor, decay: Tensor, writes: Tensor) -> tuple[Tensor, Tensor]:
    """States (B, H, n, K, V) entering each chunk of a group from s, and the state leaving it."""
    out = writes.new_empty(writes.shape)
    for j, (a, w) in enumerate(zip(decay.unbind(2), writes.unbind(2), strict=True)):
        out[:, :, j] = s
        s = a * s + w
    return out, s


class ChunkScalarGate(torch.autograd.Function):
    """(q, k, v, g chunked, s0, group) -> (o (B, H, N, C, V), S_T); backward recomputes per group."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, group):
        o = v.new_empty(v.shape)
        starts = range(0, q.shape[2], group)
        entry = q.new_empty((*q.shape[:2], len(starts), q.shape[-1], v.shape[-1]))
        s = s0
        for i, n in enumerate(starts):
            qq, kk, vv, gg = (x[:, :, n : n + group] for x in (q, k, v, g))
            eb, ekd, a, decay = _blocks(qq, kk, gg)
            entry[:, :, i] = s
            h, s = _states(s, a, (kk * ekd).transpose(-1, -2) @ vv)
            o[:, :, n : n + group] = ((qq @ kk.transpose(-1, -2)).mul_(decay)) @ vv + (qq * eb) @ h
        ctx.save_for_backward(q, k, v, g, entry)
        ctx.group = group
        return o, s

    @staticmethod
    def backward(ctx, do, ds):
        q, k, v, g, entry = ctx.saved_tensors
        group = ctx.group
        dq, dk, dv, dg = (torch.empty_like(x) for x in (q, k, v, g))
        ds = torch.zeros_like(entry[:, :, 0]) if ds is None else ds.to(entry.dtype)
        do = torch.zeros_like(v) if do is None else do
        for i, n in reversed(list(enumerate(range(0, q.shape[2], group)))):
            part = slice(n, n + group)
            qq, kk, vv, gg, dd = (x[:, :, part] for x in (q, k, v, g, do))
            eb, ekd, a, decay = _blocks(qq, kk, gg)
            kd = kk * ekd
            h, s_out = _states(entry[:, :, i], a, kd.transpose(-1, -2) @ vv)
            # dS leaving each chunk, carried backwards: h_{j+1} = a_j h_j + w_j, and chunk j reads h_j.
            read = (qq * eb).transpose(-1, -2) @ dd
            d_out = torch.empty_like(h)
            for j in reversed(range(h.shape[2])):
                d_out[:, :, j] = ds
                ds = read[:, :, j] + a[:, :, j] * ds
            h_next = torch.cat([h[:, :, 1:], s_out[:, :, None]], 2)  # the state leaving each chunk
            scores = (qq @ kk.transpose(-1, -2)).mul_(decay)
            d_scores = (dd @ vv.transpose(-1, -2)).mul_(decay)
            dv[:, :, part] = scores.transpose(-1, -2) @ dd + kd @ d_out
            gq = d_scores @ kk + eb * (dd @ h.transpose(-1, -2))
            gk = d_scores.transpose(-1, -2) @ qq + ekd * (vv @ d_out.transpose(-1, -2))
            dq[:, :, part], dk[:, :, part] = gq, gk
            local = (qq * gq - kk * gk).sum(-1, keepdim=True)  # (B, H, n, C, 1)
            carried = (h_next * d_out).sum((-1, -2))[..., None, None]  # <S_out, dS_out> per chunk
            dg[:, :, part] = local.flip(-2).cumsum(-2).flip(-2) + carried
        return dq, dk, dv, dg, ds, None


def chunk_scalar_gate(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s0: Tensor, group: int):
    """Chunked q, k (B, H, N, C, K), v (B, H, N, C, V), log-gates g (B, H, N, C, 1) <= 0 and the initial
    state s0 (B, H, K, V), all of one float dtype -> (o (B, H, N, C, V), final state (B, H, K, V))."""
    return ChunkScalarGate.apply(q, k, v, g.contiguous(), s0, group)
