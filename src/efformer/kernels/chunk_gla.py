"""Chunkwise gated linear attention: a Triton kernel (forward and backward) and its torch twins.

From "Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et al., 2023).
The recurrence, per batch and head, with a (K, V) matrix state S and per-key-dim log-gates g <= 0:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t

covers GLA (per-dim data-dependent gates), simple GLA (one data-dependent gate per head) and
retention (one fixed gate per head): the last two pass a scalar gate broadcast over K.

Three torch forms define and check the kernel: :func:`gla_parallel` (quadratic, obviously
correct), :func:`gla_recurrent` (the step loop) and :func:`chunk_gla_torch` (chunked, autograd);
:func:`chunk_gla_recompute` is the chunked form with a hand-written, recomputing backward (the CPU
fallback: lean in memory) that the tests hold to autograd's gradients of :func:`chunk_gla_torch`.
Every exponent that is evaluated is a difference "later cumulative log-gate minus earlier" and so
is <= 0: no form ever exponentiates a large positive number, whatever the sequence length.
Shapes: q, k, g (B, H, T, K); v (B, H, T, V); states (B, H, K, V); g may also be (B, H, T, 1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.kernels.chunk_scalar import chunk_scalar_gate

TRITON_CHUNK = 16  # the kernel's chunk: its intra-chunk pairwise tensor is (16, 16, K) per program
TRITON_MAX_DIM = 128  # one program holds a whole (K, V) state


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s0: Tensor | None) -> None:
    b, h, t, dk = q.shape
    if k.shape != q.shape or v.shape[:3] != (b, h, t) or g.shape[:3] != (b, h, t) or g.shape[3] not in (1, dk):
        raise ShapeError(
            f"chunk_gla: need q, k, g (B, H, T, K) and v (B, H, T, V); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}"
        )
    if s0 is not None and s0.shape != (b, h, dk, v.shape[3]):
        raise ShapeError(f"chunk_gla: initial_state must be {(b, h, dk, v.shape[3])}, got {tuple(s0.shape)}")


def _f(x: Tensor) -> Tensor:
    """x in at least float32 (float64 stays float64 so tests can check in double)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _init(q: Tensor, v: Tensor, s0: Tensor | None) -> Tensor:
    """The initial state (B, H, K, V) in the compute dtype; zeros when none is given."""
    shape = (*q.shape[:2], q.shape[-1], v.shape[-1])
    return _f(s0) if s0 is not None else q.new_zeros(shape, dtype=_f(q).dtype)


def gla_parallel(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None = None):
    """Quadratic reference: o_t = sum_{s<=t} (q_t * exp(G_t - G_s)) . k_s v_s + (q_t * exp(G_t)) S_0.

    G is the cumulative sum of g over time. Returns (o (B, H, T, V), final state (B, H, K, V)).
    """
    _check(q, k, v, g, initial_state)
    dtype, t = v.dtype, q.shape[2]
    q, k, v, G = _f(q), _f(k), _f(v), _f(g).cumsum(2)
    keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[..., None]  # (t, s, 1)
    diff = G[:, :, :, None, :] - G[:, :, None, :, :]  # (B, H, t, s, K|1)
    decay = torch.where(keep, diff, float("-inf")).exp()  # the decay mask D of the retention paper
    scores = torch.einsum("bhtk,bhsk,bhtsk->bhts", q, k, decay.expand(-1, -1, -1, -1, q.shape[-1]))
    s0 = _init(q, v, initial_state)
    o = scores @ v + (q * G.exp()) @ s0
    last = G[:, :, -1:]  # (B, H, 1, K|1)
    s_t = last.transpose(-1, -2).exp() * s0 + (k * (last - G).exp()).transpose(-1, -2) @ v
    return o.to(dtype), s_t


def gla_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None = None):
    """Step-by-step recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; returns (o, S_T)."""
    _check(q, k, v, g, initial_state)
    dtype = v.dtype
    q, k, v, g = _f(q), _f(k), _f(v), _f(g)
    s = _init(q, v, initial_state)
    out = []
    for i in range(q.shape[2]):
        s = g[:, :, i, :, None].exp() * s + k[:, :, i, :, None] * v[:, :, i, None, :]
        out.append((q[:, :, i, :, None] * s).sum(-2))
    return torch.stack(out, 2).to(dtype), s


def _chunks(q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk_size: int):
    """q, k, v, g padded to whole chunks and split into them: (B, H, N, C, *), in the compute dtype."""
    pad = (-q.shape[2]) % chunk_size  # zero q, k, v and log-gate 0 leave the state unchanged
    return tuple(F.pad(_f(x), (0, 0, 0, pad)).unflatten(2, (-1, chunk_size)) for x in (q, k, v, g))


def _chunk_terms(q: Tensor, k: Tensor, v: Tensor, g: Tensor, sub_chunk: int):
    """Everything of chunks (B, H, n, C, *) that needs no carried state.

    Returns the intra-chunk output (B, H, n, C, V), the decayed queries q e^{b} that read the state
    entering a chunk, each chunk's write (B, H, n, K, V) into the state and its decay e^{b_C}
    (B, H, n, K|1, 1), with b the cumulative log-gate within the chunk.
    """
    chunk_size = q.shape[3]
    bc = g.cumsum(3)  # (B, H, n, C, K|1)
    last = bc[:, :, :, -1:]  # (B, H, n, 1, K|1)
    qd = q * bc.exp()
    writes = (k * (last - bc).exp()).transpose(-1, -2) @ v
    decay = last.transpose(-1, -2).exp()
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    if g.shape[-1] == 1:
        # One gate per head: the decay of a pair is a (C, C) matrix, so the whole chunk is one
        # masked matmul (masking before exp keeps every evaluated exponent <= 0).
        diff = (bc - bc.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        return ((q @ k.transpose(-1, -2)) * diff.exp()) @ v, qd, writes, decay
    # Per-dim gates. Off-diagonal sub-chunk blocks: query sub-chunk i meets earlier keys through one
    # matmul taken relative to r_i, the log-gate just before sub-chunk i starts.
    c, ns = sub_chunk, chunk_size // sub_chunk
    ref = F.pad(bc[:, :, :, c - 1 :: c][:, :, :, :-1], (0, 0, 1, 0))  # (B, H, n, ns, K)
    qi = (q * (bc - ref.repeat_interleave(c, 3)).exp()).unflatten(3, (ns, c))
    earlier = torch.arange(chunk_size, device=q.device)[None, :] < (torch.arange(ns, device=q.device) * c)[:, None]
    kexp = torch.where(earlier[..., None], ref[:, :, :, :, None] - bc[:, :, :, None], float("-inf"))
    kj = k[:, :, :, None] * kexp.exp()  # (B, H, n, ns, C, K): keys of earlier sub-chunks only
    scores = torch.einsum("bhnicK,bhnisK->bhnics", qi, kj)  # (B, H, n, ns, c, C)
    # Diagonal sub-chunk blocks: exact pairwise decay, placed on the block diagonal.
    bs, qs, ks = (x.unflatten(3, (ns, c)) for x in (bc, q, k))
    diag_exp = torch.where(causal[:c, :c, None], bs[..., :, None, :] - bs[..., None, :, :], float("-inf"))
    diag = torch.einsum("bhnitK,bhnisK,bhnitsK->bhnits", qs, ks, diag_exp.exp())
    eye = torch.eye(ns, device=q.device)[:, None, :, None]  # (ns, 1, ns, 1)
    scores = (scores.unflatten(-1, (ns, c)) + eye * diag[..., None, :]).flatten(-2).flatten(3, 4)
    return scores @ v, qd, writes, decay


def _scan(s: Tensor, decay: Tensor, writes: Tensor) -> tuple[Tensor, Tensor]:
    """States (B, H, n, K, V) entering each chunk from s (B, H, K, V), and the state leaving the last.

    The chunk axis is unbound once: indexing it per chunk would make backward zero-fill a full-size
    gradient buffer per chunk (N^2 / C work). The loop only decays and adds (K, V) states.
    """
    states = []
    for a, w in zip(decay.unbind(2), writes.unbind(2), strict=True):
        states.append(s)
        s = a * s + w
    return torch.stack(states, 2), s


def _check_chunks(chunk_size: int, sub_chunk: int) -> None:
    if chunk_size <= 0 or sub_chunk <= 0 or chunk_size % sub_chunk:
        raise ConfigError("chunk_size", chunk_size, f"a positive multiple of sub_chunk={sub_chunk}")


def chunk_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    sub_chunk: int = 16,
):
    """Chunked form in torch, differentiated by autograd: matmuls within chunks, a state passed between.

    Returns (o, S_T). Within a chunk, query sub-chunk i meets earlier key sub-chunks through one
    matmul taken relative to the log-gate at the start of sub-chunk i; pairs inside a sub-chunk use
    the exact pairwise (c, c, K) decay (a scalar gate needs no sub-chunks: its decay is (C, C)). So
    every exponent is <= 0 and the matmuls stay large.
    """
    _check(q, k, v, g, initial_state)
    _check_chunks(chunk_size, sub_chunk)
    dtype, t = v.dtype, q.shape[2]
    q, k, v, g = _chunks(q, k, v, g, chunk_size)
    o, qd, writes, decay = _chunk_terms(q, k, v, g, sub_chunk)
    states, s = _scan(_init(q, v, initial_state), decay, writes)
    o = (o + qd @ states).flatten(2, 3)[:, :, :t]
    return o.to(dtype), s


CHUNKS_PER_GROUP = 4  # chunks recomputed together in the recomputing form's backward


class ChunkGLARecompute(torch.autograd.Function):
    """The chunked form with a hand-written backward that keeps only q, k, v, g and chunk states.

    Inputs are chunked (B, H, N, C, *) in the compute dtype, s0 (B, H, K, V), and the sub-chunk and
    group sizes. Forward runs groups of chunks without a graph and saves the inputs and the state
    entering each chunk (B, H, N, K, V); backward walks the groups in reverse, recomputes each
    group's chunk-local terms under autograd, carries dS across chunks by hand and lets autograd
    take the chunk-local terms back to q, k, v, g. Peak memory is one group's graph, not the whole
    sequence's, as in flash-linear-attention's chunk_gla.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, s0, sub_chunk, group):
        o = v.new_empty(v.shape)
        states = q.new_empty((*q.shape[:3], q.shape[-1], v.shape[-1]))
        s = s0
        for n in range(0, q.shape[2], group):
            part = slice(n, n + group)
            o_in, qd, writes, decay = _chunk_terms(*(x[:, :, part] for x in (q, k, v, g)), sub_chunk)
            states[:, :, part], s = _scan(s, decay, writes)
            o[:, :, part] = o_in + qd @ states[:, :, part]
        ctx.save_for_backward(q, k, v, g, states)
        ctx.sub_chunk, ctx.group = sub_chunk, group
        return o, s

    @staticmethod
    def backward(ctx, do, ds):
        q, k, v, g, states = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (q, k, v, g)]
        ds = torch.zeros_like(states[:, :, 0]) if ds is None else ds
        do = torch.zeros_like(v) if do is None else do
        starts = range(0, q.shape[2], ctx.group)
        for n in reversed(starts):
            part = slice(n, n + ctx.group)
            ins = [x[:, :, part].detach().requires_grad_() for x in (q, k, v, g)]
            h, do_n = states[:, :, part], do[:, :, part]
            with torch.enable_grad():
                o_in, qd, writes, decay = _chunk_terms(*ins, ctx.sub_chunk)
                o_n = o_in + qd @ h
            read = qd.detach().transpose(-1, -2) @ do_n  # dL/dh through the chunk's own outputs
            # dS leaving chunk j is dS entering j + 1: h_{j+1} = a_j h_j + w_j.
            d_writes, d_decay = [], []
            for j in reversed(range(h.shape[2])):
                d_writes.append(ds)
                d_decay.append((h[:, :, j] * ds).sum(-1, keepdim=True))
                ds = read[:, :, j] + decay[:, :, j].detach() * ds
            d_writes, d_decay = torch.stack(d_writes[::-1], 2), torch.stack(d_decay[::-1], 2)
            if decay.shape[-2] == 1:  # a scalar gate's decay (.., 1, 1) was broadcast over K
                d_decay = d_decay.sum(-2, keepdim=True)
            got = torch.autograd.grad((o_n, writes, decay), ins, (do_n, d_writes, d_decay))
            for buf, gr in zip(grads, got, strict=True):
                buf[:, :, part] = gr
        return *grads, ds, None, None


def chunk_gla_recompute(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    sub_chunk: int = 16,
    chunks_per_group: int = CHUNKS_PER_GROUP,
):
    """:func:`chunk_gla_torch` with the lean backward of :class:`ChunkGLARecompute`; returns (o, S_T)."""
    _check(q, k, v, g, initial_state)
    _check_chunks(chunk_size, sub_chunk)
    if chunks_per_group <= 0:
        raise ConfigError("chunks_per_group", chunks_per_group, "a positive integer")
    dtype, t = v.dtype, q.shape[2]
    q, k, v, g = _chunks(q, k, v, g, chunk_size)
    if g.shape[-1] == 1:  # one gate per head: closed-form backward, no recorded graph
        o, s = chunk_scalar_gate(q, k, v, g, _init(q, v, initial_state), chunks_per_group)
    else:
        o, s = ChunkGLARecompute.apply(q, k, v, g, _init(q, v, initial_state), sub_chunk, chunks_per_group)
    return o.flatten(2, 3)[:, :, :t].to(dtype), s


# ---- Triton kernel ------------------------------------------------------------------------------
# Four programs, each over chunks of TRITON_CHUNK steps, one (batch, head) per program:
#   _fwd_states   sequential over chunks: the state entering each chunk, and the final state;
#   _fwd_output   parallel over chunks: o = (q * exp(b)) S_n + intra-chunk pairwise term;
#   _bwd_states   reverse over chunks: dS, the gradient of the state leaving each chunk, and dS_0;
#   _bwd_grads    parallel over chunks: dq, dk, dv.
# The log-gate gradient needs no kernel: with G the cumulative log-gate, every use of G is through
# q_t exp(G_t), k_s exp(-G_s) and the final state, so dL/dG_t = q_t dq_t - k_t dk_t (+ S_T dS_T at
# t = T) and dg is its reverse cumulative sum over time.
if triton is not None:

    @triton.jit
    def _load(ptr, rows, cols, n_rows, n_cols: tl.constexpr):
        """A (rows, cols) tile of a row-major (n_rows, n_cols) matrix in float32, zero outside it."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store(ptr, x, rows, cols, n_rows, n_cols: tl.constexpr):
        """Store a (rows, cols) tile into a row-major (n_rows, n_cols) matrix, clipped to it."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tl.store(ptr + rows[:, None] * n_cols + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _intra_decay(b, BT: tl.constexpr):
        """(BT, BT, BK) exp(b_t - b_s) for s <= t, else 0; the exponent is never positive."""
        o = tl.arange(0, BT)
        causal = (o[:, None] >= o[None, :])[:, :, None]
        return tl.where(causal, tl.exp(tl.where(causal, b[:, None, :] - b[None, :, :], 0.0)), 0.0)

    @triton.jit
    def _fwd_states(
        k,
        v,
        g,
        h,
        h0,
        ht,
        T,
        NC,
        K: tl.constexpr,
        V: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_H0: tl.constexpr,
        PREC: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        ot, ok, ov = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
        s = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_H0:
            s += _load(h0 + bh * K * V, ok, ov, K, V)
        for n in range(NC):
            _store(h + (bh * NC + n) * K * V, s, ok, ov, K, V)
            t = n * BT + ot
            kk = _load(k + bh * T * K, t, ok, T, K)
            gg = _load(g + bh * T * K, t, ok, T, K)
            vv = _load(v + bh * T * V, t, ov, T, V)
            b = tl.cumsum(gg, axis=0)
            last = tl.sum(gg, axis=0)
            kd = kk * tl.exp(last[None, :] - b)
            s = s * tl.exp(last)[:, None] + tl.dot(tl.trans(kd), vv, input_precision=PREC)
        _store(ht + bh * K * V, s, ok, ov, K, V)

    @triton.jit
    def _fwd_output(
        q,
        k,
        v,
        g,
        h,
        o,
        T,
        NC,
        K: tl.constexpr,
        V: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        t, ok, ov = n * BT + tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
        qq = _load(q + bh * T * K, t, ok, T, K)
        kk = _load(k + bh * T * K, t, ok, T, K)
        gg = _load(g + bh * T * K, t, ok, T, K)
        vv = _load(v + bh * T * V, t, ov, T, V)
        s = _load(h + (bh * NC + n) * K * V, ok, ov, K, V)
        b = tl.cumsum(gg, axis=0)
        a = tl.sum(qq[:, None, :] * kk[None, :, :] * _intra_decay(b, BT), axis=2)
        out = tl.dot(qq * tl.exp(b), s, input_precision=PREC) + tl.dot(a, vv, input_precision=PREC)
        _store(o + bh * T * V, out, t, ov, T, V)

    @triton.jit
    def _bwd_states(
        q,
        g,
        do,
        dh,
        dht,
        dh0,
        T,
        NC,
        K: tl.constexpr,
        V: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        ot, ok, ov = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
        ds = _load(dht + bh * K * V, ok, ov, K, V)
        for i in range(NC):
            n = NC - 1 - i
            _store(dh + (bh * NC + n) * K * V, ds, ok, ov, K, V)
            t = n * BT + ot
            qq = _load(q + bh * T * K, t, ok, T, K)
            gg = _load(g + bh * T * K, t, ok, T, K)
            dd = _load(do + bh * T * V, t, ov, T, V)
            b = tl.cumsum(gg, axis=0)
            last = tl.sum(gg, axis=0)
            ds = ds * tl.exp(last)[:, None] + tl.dot(tl.trans(qq * tl.exp(b)), dd, input_precision=PREC)
        _store(dh0 + bh * K * V, ds, ok, ov, K, V)

    @triton.jit
    def _bwd_grads(
        q,
        k,
        v,
        g,
        h,
        dh,
        do,
        dq,
        dk,
        dv,
        T,
        NC,
        K: tl.constexpr,
        V: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PREC: tl.constexpr,
    ):
        n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        t, ok, ov = n * BT + tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
        qq = _load(q + bh * T * K, t, ok, T, K)
        kk = _load(k + bh * T * K, t, ok, T, K)
        gg = _load(g + bh * T * K, t, ok, T, K)
        vv = _load(v + bh * T * V, t, ov, T, V)
        dd = _load(do + bh * T * V, t, ov, T, V)
        s = _load(h + (bh * NC + n) * K * V, ok, ov, K, V)
        ds = _load(dh + (bh * NC + n) * K * V, ok, ov, K, V)
        b = tl.cumsum(gg, axis=0)
        last = tl.sum(gg, axis=0)
        kd = tl.exp(last[None, :] - b)
        e = _intra_decay(b, BT)
        a = tl.sum(qq[:, None, :] * kk[None, :, :] * e, axis=2)  # (BT, BT) intra-chunk scores
        o = tl.arange(0, BT)
        da = tl.where(o[:, None] >= o[None, :], tl.dot(dd, tl.trans(vv), input_precision=PREC), 0.0)
        dqq = tl.exp(b) * tl.dot(dd, tl.trans(s), input_precision=PREC)
        dqq += tl.sum(da[:, :, None] * kk[None, :, :] * e, axis=1)
        dkk = kd * tl.dot(vv, tl.trans(ds), input_precision=PREC)
        dkk += tl.sum(da[:, :, None] * qq[:, None, :] * e, axis=0)
        dvv = tl.dot(kk * kd, ds, input_precision=PREC) + tl.dot(tl.trans(a), dd, input_precision=PREC)
        _store(dq + bh * T * K, dqq, t, ok, T, K)
        _store(dk + bh * T * K, dkk, t, ok, T, K)
        _store(dv + bh * T * V, dvv, t, ov, T, V)


def _launch(q: Tensor, v: Tensor) -> dict:
    """Grid sizes and block constants shared by the four programs."""
    b, h, t, dk = q.shape
    nc = triton.cdiv(t, TRITON_CHUNK)
    return dict(
        bh=b * h,
        nc=nc,
        meta=dict(
            K=dk,
            V=v.shape[-1],
            BT=TRITON_CHUNK,
            BK=max(16, triton.next_power_of_2(dk)),
            BV=max(16, triton.next_power_of_2(v.shape[-1])),
            # fp32 tensors keep fp32 products (no TF32), so the kernel matches the torch forms.
            PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        ),
    )


class ChunkGLAFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernel: (q, k, v, g (B, H, T, K), S_0 or None) -> (o, S_T)."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        L = _launch(q, v)
        b, hh, t, dk = q.shape
        h = q.new_empty(b, hh, L["nc"], dk, v.shape[-1], dtype=torch.float32)
        ht = q.new_empty(b, hh, dk, v.shape[-1], dtype=torch.float32)
        o = torch.empty_like(v)
        has_h0 = s0 is not None
        h0 = s0.contiguous() if has_h0 else ht
        _fwd_states[(L["bh"],)](k, v, g, h, h0, ht, t, L["nc"], HAS_H0=has_h0, **L["meta"])
        _fwd_output[(L["nc"], L["bh"])](q, k, v, g, h, o, t, L["nc"], **L["meta"])
        ctx.save_for_backward(q, k, v, g, h, ht)
        ctx.has_h0 = has_h0
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h, ht = ctx.saved_tensors
        L = _launch(q, v)
        t = q.shape[2]
        do = do.contiguous()
        dht = dht.float().contiguous() if dht is not None else torch.zeros_like(ht)
        dh, dh0 = torch.empty_like(h), torch.empty_like(ht)
        _bwd_states[(L["bh"],)](q, g, do, dh, dht, dh0, t, L["nc"], **L["meta"])
        dq, dk = (torch.empty_like(q, dtype=torch.float32) for _ in range(2))
        dv = torch.empty_like(v, dtype=torch.float32)
        _bwd_grads[(L["nc"], L["bh"])](q, k, v, g, h, dh, do, dq, dk, dv, t, L["nc"], **L["meta"])
        dlog = q.float() * dq - k.float() * dk
        dlog[:, :, -1] += (ht * dht).sum(-1)  # the final state depends on the total log-gate
        dg = dlog.flip(2).cumsum(2).flip(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dh0 if ctx.has_h0 else None


def triton_runs(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on ``device``: triton installed, and CUDA or TRITON_INTERPRET=1."""
    return triton is not None and (torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    *,
    chunk_size: int = 64,
    sub_chunk: int = 16,
    backend: str = "auto",
):
    """Chunkwise gated linear attention -> (o (B, H, T, V), final state (B, H, K, V) float32).

    ``backend``: "triton" (the kernel), "torch" (:func:`chunk_gla_recompute` with ``chunk_size``
    and ``sub_chunk``) or "auto" (Triton where :func:`triton_runs` and K, V <= 128, else torch).
    """
    _check(q, k, v, g, initial_state)
    fits = max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_DIM
    if backend == "auto":
        backend = "triton" if triton_runs(q.device) and fits else "torch"
    if backend == "torch":
        return chunk_gla_recompute(q, k, v, g, initial_state, chunk_size, sub_chunk)
    if backend != "triton":
        raise ConfigError("backend", backend, "one of 'auto', 'triton', 'torch'")
    if not triton_runs(q.device):
        raise CapabilityError(
            "chunk_gla: the Triton kernel needs triton and CUDA tensors (or TRITON_INTERPRET=1 set before "
            "importing efformer); use backend='torch' or 'auto'"
        )
    if not fits:
        raise ShapeError(
            f"chunk_gla: the Triton kernel holds K, V <= {TRITON_MAX_DIM}; got {q.shape[-1]}, "
            f"{v.shape[-1]}; use backend='torch'"
        )
    g = g.expand(-1, -1, -1, q.shape[-1])
    return ChunkGLAFunction.apply(q, k, v, g, initial_state)
