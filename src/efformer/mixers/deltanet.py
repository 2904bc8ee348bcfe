"""Delta-rule linear attention: DeltaNet and Gated DeltaNet.

Papers: "Linear Transformers Are Secretly Fast Weight Programmers" (Schlag, Irie and Schmidhuber,
2021) introduces the delta-rule update of a fast-weight memory; "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length" (Yang et al., 2024) trains it chunkwise in parallel with
the WY / UT-transform representation of products of Householder-like matrices; "Gated Delta
Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz and Hatamizadeh, 2025) adds a
data-dependent scalar decay per head.

The state S is stored as (batch, heads, K, V), the transpose of the papers' V x K fast weight, so
the recurrence reads

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t,

with alpha_t = 1 for DeltaNet. Writing v at a unit key k with beta = 1 replaces the value stored
at k instead of adding to it, which is what makes the memory addressable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from efformer.mixers.base import (
    RESET_LOG_DECAY,
    Mixer,
    MixerOptions,
    MixerState,
    bare_linear,
    causal_recurrent,
    pad_to_multiple,
    segment_starts,
    seq_rows,
)
from efformer.nn.recurrent import ShortConv, causal_taps, inverse_softplus_dt, log_decay_rates
from efformer.registry import register_mixer

# ---- the delta rule on (batch, heads, seq, dim) tensors -------------------------------------------
# q, k (b, h, t, K) with unit-norm keys; v (b, h, t, V); beta (b, h, t) in [0, 1]; log_alpha (b, h, t)
# <= 0 or None (no decay); initial_state (b, h, K, V) or None (zeros). Each returns o (b, h, t, V) and
# the final state (b, h, K, V).


def _start(q: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None, initial_state: Tensor | None):
    b, h, _, dk = q.shape
    if log_alpha is None:
        log_alpha = torch.zeros_like(beta)
    if initial_state is None:
        initial_state = q.new_zeros(b, h, dk, v.shape[-1])
    return log_alpha, initial_state


def delta_rule_reference(q, k, v, beta, log_alpha=None, initial_state=None) -> tuple[Tensor, Tensor]:
    """The recurrence as written in the papers, one step at a time with the explicit K x K matrix."""
    log_alpha, S = _start(q, v, beta, log_alpha, initial_state)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    outs = []
    for t in range(q.shape[2]):
        kt, bt = k[:, :, t, :, None], beta[:, :, t, None, None]  # (b, h, K, 1), (b, h, 1, 1)
        alpha = log_alpha[:, :, t, None, None].exp()
        S = alpha * (eye - bt * kt @ kt.transpose(-1, -2)) @ S + bt * kt @ v[:, :, t, None, :]
        outs.append((S.transpose(-1, -2) @ q[:, :, t, :, None])[..., 0])
    return torch.stack(outs, dim=2), S


def delta_rule_recurrent(q, k, v, beta, log_alpha=None, initial_state=None) -> tuple[Tensor, Tensor]:
    """O(K V) per token (the decode path): decay, read the value stored at k, move it towards v, read at q."""
    log_alpha, S = _start(q, v, beta, log_alpha, initial_state)
    outs = []
    for t in range(q.shape[2]):
        S = S * log_alpha[:, :, t, None, None].exp()
        kt = k[:, :, t]
        old = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, beta[:, :, t, None] * (v[:, :, t] - old))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def _delta_chunks(q, k, v, beta, log_alpha, c: int):
    """Inputs padded to whole chunks of c and split: q, k, v (b, h, n, c, d); beta, log_alpha (b, h, n, c)."""
    # Right-padding with k = v = beta = log_alpha = 0 appends identity steps: S is unchanged.
    q, k, v = (rearrange(pad_to_multiple(x, c, dim=2)[0], "b h (n c) d -> b h n c d", c=c) for x in (q, k, v))
    beta, g = (rearrange(pad_to_multiple(x, c, dim=2)[0], "b h (n c) -> b h n c", c=c) for x in (beta, log_alpha))
    return q, k, v, beta, g


def _delta_terms(q, k, v, beta, g):
    """Everything of chunks (b, h, n, c, *) that needs no carried state.

    Returns U0 (b, h, n, c, V) and W (b, h, n, c, K) of U = U0 - W S0, the intra-chunk scores
    (Q K^T * Gamma) (b, h, n, c, c), the decayed queries e^G Q, the transposed decayed keys
    (e^{G_C - G} K)^T (b, h, n, K, c) and the chunk decay e^{G_C} (b, h, n, 1, 1).
    """
    c, dv = q.shape[3], v.shape[-1]
    g = g.cumsum(-1)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    gamma = (g[..., :, None] - g[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # 0 above the diagonal
    a = ((k @ k.transpose(-1, -2)) * gamma * beta[..., :, None]).tril(-1)
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta[..., None], k * (beta * g.exp())[..., None]], dim=-1)
    u0, w = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True).split([dv, q.shape[-1]], -1)
    qk = (q @ k.transpose(-1, -2)) * gamma
    q_dec = q * g.exp()[..., None]
    k_dec_t = (k * (g[..., -1:] - g).exp()[..., None]).transpose(-1, -2)
    return u0, w, qk, q_dec, k_dec_t, g[..., -1, None, None].exp()


def _delta_scan(S: Tensor, u0: Tensor, w: Tensor, k_dec_t: Tensor, decay: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """States entering each chunk (b, h, n, K, V), the values written U (b, h, n, c, V), and the last state.

    The chunk axis is unbound once: indexing it per chunk would make backward zero-fill a full-size
    gradient buffer per chunk (N^2 / C work).
    """
    states, us = [], []
    for u0_j, w_j, kd_j, a_j in zip(*(x.unbind(2) for x in (u0, w, k_dec_t, decay)), strict=True):
        u = u0_j - w_j @ S
        states.append(S)
        us.append(u)
        S = a_j * S + kd_j @ u
    return torch.stack(states, 2), torch.stack(us, 2), S


def delta_rule_chunked(
    q, k, v, beta, log_alpha=None, initial_state=None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Chunkwise parallel form (WY / UT transform), differentiated by autograd; a loop over T / C chunks only.

    Within a chunk started from state S0, with G_t the cumulative log decay and
    Gamma_ti = exp(G_t - G_i) (i <= t), the values actually written, u_t = beta_t (v_t - alpha_t
    S_{t-1}^T k_t), solve the unit lower-triangular system

        (I + tril(diag(beta) (K K^T * Gamma), -1)) U = diag(beta) V - diag(beta e^G) K S0,

    so U = U0 - W S0 with U0, W computed for all chunks at once; then
    O = e^G Q S0 + (Q K^T * Gamma) U and S_C = e^{G_C} S0 + (e^{G_C - G} K)^T U.
    Only differences G_t - G_i <= 0 are exponentiated, so strong decay never overflows.
    """
    log_alpha, S = _start(q, v, beta, log_alpha, initial_state)
    t = q.shape[2]
    u0, w, qk, q_dec, k_dec_t, decay = _delta_terms(*_delta_chunks(q, k, v, beta, log_alpha, min(chunk_size, t)))
    states, u, S = _delta_scan(S, u0, w, k_dec_t, decay)
    o = rearrange(q_dec @ states + qk @ u, "b h n c d -> b h (n c) d")
    return o[:, :, :t], S


def _chunk_cotangents(terms, h: Tensor, do: Tensor, dS: Tensor):
    """Cotangents of a group's chunk terms (the six of :func:`_delta_terms`) and dL/d(state entering it).

    ``h`` (b, h, n, K, V) the states entering the group's chunks, ``do`` (b, h, n, c, V) dL/dO, ``dS``
    dL/d(state leaving the group). dS is carried across chunks by hand (U_j = U0_j - W_j S_j,
    O_j = Qd_j S_j + QK_j U_j, S_{j+1} = a_j S_j + Kd_j^T U_j), so autograd only sees chunk-local terms.
    """
    u0, w, qk, q_dec, k_dec_t, decay = terms
    u = u0 - w @ h
    from_o = qk.transpose(-1, -2) @ do  # dL/dU through the chunk's own outputs
    read = q_dec.transpose(-1, -2) @ do  # dL/dS_j through the chunk's own outputs
    du, ds_next = [], []
    for j in reversed(range(h.shape[2])):
        ds_next.append(dS)
        du_j = from_o[:, :, j] + k_dec_t[:, :, j].transpose(-1, -2) @ dS
        du.append(du_j)
        dS = read[:, :, j] - w[:, :, j].transpose(-1, -2) @ du_j + decay[:, :, j] * dS
    du, ds_next = torch.stack(du[::-1], 2), torch.stack(ds_next[::-1], 2)
    cot = (
        du,  # U0
        -du @ h.transpose(-1, -2),  # W
        do @ u.transpose(-1, -2),  # QK
        do @ h.transpose(-1, -2),  # Qd
        ds_next @ u.transpose(-1, -2),  # Kd^T
        (h * ds_next).sum((-1, -2), keepdim=True),  # a
    )
    return cot, dS


CHUNKS_PER_GROUP = 16  # chunks recomputed together in the recomputing form's backward


class DeltaRuleRecompute(torch.autograd.Function):
    """The chunked delta rule with a hand-written backward that keeps only its inputs and chunk states.

    Inputs are chunked (see :func:`_delta_chunks`), S0 (b, h, K, V) and the group size. Forward runs
    groups of chunks without a graph and saves the inputs and the state entering each chunk;
    backward walks the groups in reverse, recomputes each group's chunk-local terms under autograd,
    carries dS across chunks by hand (:func:`_chunk_cotangents`) and lets autograd take the
    chunk-local terms back to the inputs.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S, group):
        o = v.new_empty(v.shape)
        states = q.new_empty((*q.shape[:3], q.shape[-1], v.shape[-1]))
        for n in range(0, q.shape[2], group):
            part = slice(n, n + group)
            u0, w, qk, q_dec, k_dec_t, decay = _delta_terms(*(x[:, :, part] for x in (q, k, v, beta, g)))
            states[:, :, part], u, S = _delta_scan(S, u0, w, k_dec_t, decay)
            o[:, :, part] = q_dec @ states[:, :, part] + qk @ u
        ctx.save_for_backward(q, k, v, beta, g, states)
        ctx.group = group
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, beta, g, states = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (q, k, v, beta, g)]
        dS = torch.zeros_like(states[:, :, 0]) if dS is None else dS
        do = torch.zeros_like(v) if do is None else do
        for n in reversed(range(0, q.shape[2], ctx.group)):
            part = slice(n, n + ctx.group)
            ins = [x[:, :, part].detach().requires_grad_() for x in (q, k, v, beta, g)]
            h, do_n = states[:, :, part], do[:, :, part]
            with torch.enable_grad():
                terms = _delta_terms(*ins)
            cot, dS = _chunk_cotangents([x.detach() for x in terms], h, do_n, dS)
            got = torch.autograd.grad(terms, ins, cot)
            for buf, gr in zip(grads, got, strict=True):
                buf[:, :, part] = gr
        return *grads, dS, None


def delta_rule_recompute(
    q, k, v, beta, log_alpha=None, initial_state=None, chunk_size: int = 64, chunks_per_group: int = CHUNKS_PER_GROUP
) -> tuple[Tensor, Tensor]:
    """:func:`delta_rule_chunked` with the lean backward of :class:`DeltaRuleRecompute`; (o, final state)."""
    log_alpha, S = _start(q, v, beta, log_alpha, initial_state)
    t = q.shape[2]
    chunks = _delta_chunks(q, k, v, beta, log_alpha, min(chunk_size, t))
    o, S = DeltaRuleRecompute.apply(*chunks, S, chunks_per_group)
    return rearrange(o, "b h n c d -> b h (n c) d")[:, :, :t], S


def normed_heads(u: Tensor, heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (b, h, n, d) unit-norm (q scaled by d^-1/2) and v (b, h, n, d) in ``dtype``, from u (b, n, 3*h*d)."""
    q, k, v = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in u.chunk(3, dim=-1))
    q = F.normalize(q, dim=-1) * q.shape[-1] ** -0.5
    return q.to(dtype), F.normalize(k, dim=-1).to(dtype), v.to(dtype)


def _group_qkv(xs, w, keep, conv_w, seg, pad: int, heads: int, dtype):
    """q, k, v (b, h, n, d) of one group from its input rows xs (b, w-1+n-pad, d_model), which begin with
    the conv's w-1 rows of history, ``pad`` of them before the sequence start (zeros, segment id -2)."""
    u = F.linear(xs, w)
    if keep is not None:
        u = u * keep
    if conv_w is not None:
        u = F.pad(u, (0, 0, pad, 0))
        seg = F.pad(seg, (pad, 0), value=-2) if seg is not None else None
        u = F.silu(causal_taps(u, conv_w, None, seg))
    return normed_heads(u, heads, dtype)


class DeltaLayerRecompute(torch.autograd.Function):
    """A DeltaNet layer's path from x to the delta rule's output, from a zero state, keeping almost nothing.

    x (b, n, d_model), the fused q|k|v weight (3*d_model, d_model), keep (b, n, 1) or None (padding),
    the conv weight (3*d_model, 1, w) or None, segment ids (b, n) or None, beta and log alpha
    (b, h, n), then heads, chunk size and chunks per group -> o (b, h, n, V) in float32 or wider.
    Forward runs groups of chunks without a graph and keeps x, the per-token gates and the state
    entering each group. Backward walks the groups in reverse and re-runs each group's projection,
    conv, norms and chunk terms under autograd (so the layer never holds the (b, n, 3*d_model)
    projections, conv outputs and normed q, k of the whole sequence), carries dS by hand
    (:func:`_chunk_cotangents`) and adds the group's input rows' gradient into dx (the conv's w-1
    rows of history overlap the group before).
    """

    @staticmethod
    def forward(ctx, x, w, keep, conv_w, seg, beta, g, heads, chunk, group):
        dt = torch.promote_types(x.dtype, torch.float32)
        n, span = x.shape[1], chunk * group
        hist = conv_w.shape[-1] - 1 if conv_w is not None else 0
        starts = range(0, n, span)
        o = entry = S = None
        for i, lo in enumerate(starts):
            hi, a = min(lo + span, n), max(lo - hist, 0)
            rows = x[:, a:hi], w, seq_rows(keep, a, hi), conv_w, seq_rows(seg, a, hi), a - (lo - hist)
            q, k, v = _group_qkv(*rows, heads, dt)
            if o is None:
                o = v.new_empty(*v.shape[:2], n, v.shape[-1])
                S = v.new_zeros(*v.shape[:2], q.shape[-1], v.shape[-1])
                entry = v.new_empty(*v.shape[:2], len(starts), *S.shape[2:])
            entry[:, :, i] = S
            chunks = _delta_chunks(q, k, v, beta[..., lo:hi], g[..., lo:hi], chunk)
            u0, wy, qk, q_dec, k_dec_t, decay = _delta_terms(*chunks)
            h, u, S = _delta_scan(S, u0, wy, k_dec_t, decay)
            o[:, :, lo:hi] = rearrange(q_dec @ h + qk @ u, "b h n c d -> b h (n c) d")[:, :, : hi - lo]
        ctx.save_for_backward(x, w, keep, conv_w, seg, beta, g, entry)
        ctx.meta = heads, chunk, group
        return o

    @staticmethod
    def backward(ctx, do):
        x, w, keep, conv_w, seg, beta, g, entry = ctx.saved_tensors
        heads, chunk, group = ctx.meta
        dt, n, span = entry.dtype, x.shape[1], chunk * group
        hist = conv_w.shape[-1] - 1 if conv_w is not None else 0
        need = ctx.needs_input_grad
        dx = torch.zeros_like(x) if need[0] else None  # zeros: neighbouring groups' rows overlap
        dw = torch.zeros_like(w) if need[1] else None
        dconv = torch.zeros_like(conv_w) if conv_w is not None and need[3] else None
        dbeta = torch.empty_like(beta) if need[5] else None
        dg = torch.empty_like(g) if need[6] else None
        dS = torch.zeros_like(entry[:, :, 0])
        for i, lo in reversed(list(enumerate(range(0, n, span)))):
            hi, a = min(lo + span, n), max(lo - hist, 0)
            ins = [x[:, a:hi], w, conv_w, beta[..., lo:hi], g[..., lo:hi]]
            wants = need[:2] + need[3:4] + need[5:7]
            ins = [t.detach().requires_grad_(r) if t is not None else None for t, r in zip(ins, wants, strict=True)]
            xs, wl, cl, bl, gl = ins
            with torch.enable_grad():
                rows = xs, wl, seq_rows(keep, a, hi), cl, seq_rows(seg, a, hi), a - (lo - hist)
                q, k, v = _group_qkv(*rows, heads, dt)
                terms = _delta_terms(*_delta_chunks(q, k, v, bl, gl, chunk))
            plain = [t.detach() for t in terms]
            h = _delta_scan(entry[:, :, i], plain[0], plain[1], plain[4], plain[5])[0]
            do_n = F.pad(do[:, :, lo:hi], (0, 0, 0, h.shape[2] * chunk - (hi - lo)))
            do_n = rearrange(do_n, "b h (n c) d -> b h n c d", c=chunk)
            cot, dS = _chunk_cotangents(plain, h, do_n, dS)
            live = [(t, c) for t, c in zip(terms, cot, strict=True) if t.requires_grad]  # the decay needs g's grad
            leaves = [t for t in ins if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad([t for t, _ in live], leaves, [c for _, c in live]))
            if need[0]:
                dx[:, a:hi] += next(got)
            if need[1]:
                dw += next(got)
            if dconv is not None:
                dconv += next(got)
            if need[5]:
                dbeta[..., lo:hi] = next(got)
            if need[6]:
                dg[..., lo:hi] = next(got)
        return dx, dw, None, dconv, None, dbeta, dg, None, None, None


def _rms(o: Tensor, eps: float, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """o (b, h, n, d) RMS-normalised over d, as (b, n, h, d) in ``dt``, and 1/rms (b, n, h, 1)."""
    on = o.transpose(1, 2).to(dt)
    rstd = on.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return on * rstd, rstd


class HeadNormGate(torch.autograd.Function):
    """rms_norm(o) * w per head, merged, times swish(x W_g^T) if W_g is given -> (b, n, h*d).

    o (b, h, n, d), w (d,), eps, x (b, n, d_model) and W_g (h*d, d_model), or None and None. Keeps
    only its inputs (o and x are kept by the layer anyway) and rebuilds the norm and the gate in
    backward: autograd would keep the normed o, its merged copy, the gate's pre-activation and its
    swish, four (b, n, h*d) tensors, as much as the whole recomputing delta rule keeps.
    """

    @staticmethod
    def forward(ctx, o, w, eps, x, wg):
        dt = torch.promote_types(o.dtype, torch.float32)
        y = _rms(o, eps, dt)[0].mul_(w.to(dt)).flatten(-2)
        if wg is not None:
            y = y.mul_(F.silu(F.linear(x, wg).to(dt)))
        ctx.save_for_backward(o, w, x, wg)
        ctx.eps, ctx.dt = eps, dt
        return y.to(o.dtype)

    @staticmethod
    def backward(ctx, dy):
        o, w, x, wg = ctx.saved_tensors
        dt = ctx.dt
        dy = dy.to(dt)
        xhat, rstd = _rms(o, ctx.eps, dt)
        dx = dwg = None
        if wg is not None:
            z = F.linear(x, wg).to(dt)
            sig = torch.sigmoid(z)
            dz = (xhat * w.to(dt)).flatten(-2).mul_(dy).mul_(sig)
            dz.mul_(torch.sub(1, sig).mul_(z).add_(1))  # swish'(z) = sig (1 + z (1 - sig))
            dz = dz.to(x.dtype)
            dx = dz @ wg if ctx.needs_input_grad[3] else None
            dwg = dz.flatten(0, -2).transpose(0, 1) @ x.flatten(0, -2) if ctx.needs_input_grad[4] else None
            del dz
            dy = z.mul_(sig).mul_(dy)  # d(normed o) = dy * swish(z)
            del sig
        dn = dy.view_as(xhat)
        dw = (dn * xhat).sum((0, 1, 2))
        dxh = dn.mul_(w.to(dt))
        do = dxh.sub_(xhat.mul_((dxh * xhat).mean(-1, keepdim=True))).mul_(rstd)
        return do.transpose(1, 2).to(o.dtype), dw.to(w.dtype), None, dx, dwg


# ---- the layers -------------------------------------------------------------------------------------


@dataclass
class DeltaState(MixerState):
    """Decode state: fast weights S (batch, heads, K, V) and the conv cache (batch, 3*d_model, conv_size-1)."""

    S: Tensor
    conv: Tensor | None = None


class DeltaNetOptions(MixerOptions):
    """Options of DeltaNet."""

    chunk_size: int = pydantic.Field(64, gt=0, description="tokens per chunk of the chunked (WY) form")
    conv_size: int = pydantic.Field(4, ge=0, description="width of the causal depthwise conv on q, k, v; 0 = off")
    output_gate: bool = pydantic.Field(
        False,
        description="multiply the normed output by silu(W_g x), as Gated DeltaNet does",
    )


class GatedDeltaNetOptions(DeltaNetOptions):
    """Options of Gated DeltaNet (the output gate is on by default)."""

    output_gate: bool = pydantic.Field(True, description="multiply the normed output by silu(W_g x)")


_FORMS = {"reference": delta_rule_reference, "recurrent": delta_rule_recurrent, "chunked": delta_rule_recompute}


@register_mixer("deltanet")
class DeltaNet(Mixer):
    """DeltaNet: linear attention whose fast-weight memory is updated by the delta rule (causal only).

    q, k are L2-normalised per head (after an optional short causal conv + SiLU), beta_t = sigmoid(W_b x_t)
    per head; the output is RMS-normed per head (and optionally gated) before the output projection.
    A padded step writes nothing (beta = 0, alpha = 1, zero conv input), so left-padded batches are exact;
    a hole inside a sequence leaves S unchanged but enters the conv window as a zero input.
    """

    capabilities = causal_recurrent(
        paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
        time="O(N C d + N d^2) chunked, O(d^2) per decoded token",
        memory="O(N C + N d + d^2) per head",
        forms=("reference", "chunked", "recurrent"),
        packing=True,  # a reset decay at each segment start; the short conv is segment-masked
    )
    Options = DeltaNetOptions
    test_options = {"chunk_size": 4, "conv_size": 3}
    gated: ClassVar[bool] = False

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.beta_proj = nn.Linear(d_model, n_heads)
        w = self.opts.conv_size
        if w:
            self.conv = ShortConv(3 * d_model, w, bias=False)
        if self.gated:
            self._init_decay(d_model, n_heads)
        if self.opts.output_gate:
            self.gate_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused q|k|v projection, and the output projection."""
        return {"value": [self.qkv_proj.weight[2 * self.d_model :]], "output": [self.out_proj.weight]}

    def init_state(self, batch, device, dtype) -> DeltaState:
        """Zero fast weights (kept in at least fp32, as they accumulate) and a zero conv cache."""
        hd, w = self.head_dim, self.opts.conv_size
        s_dtype = torch.promote_types(dtype, torch.float32)
        S = torch.zeros(batch, self.n_heads, hd, hd, device=device, dtype=s_dtype)
        conv = torch.zeros(batch, 3 * self.d_model, w - 1, device=device, dtype=dtype) if w else None
        return DeltaState(S=S, conv=conv)

    # ---- shared parts of every form -----------------------------------------------------------
    def _log_decay(self, x: Tensor) -> Tensor | None:
        """log alpha (batch, seq, heads), or None: DeltaNet has no decay."""
        return None

    def _conv(self, u: Tensor, state: DeltaState | None, segments: Tensor | None = None) -> Tensor:
        """Short causal conv + SiLU over (b, n, 3*d_model), continuing from the cached last inputs
        (packed ``segments``: never across a segment boundary)."""
        y, window = self.conv(u, state.conv if state is not None else None, segments)
        if state is not None:
            state.conv = window
        return F.silu(y)

    def _gates(self, x: Tensor, mask: Tensor | None, segments: Tensor | None):
        """beta (b, h, n) and log alpha (b, h, n) or None, with padded steps and segment starts applied."""
        beta = self.beta_proj(x).sigmoid()
        log_alpha = self._log_decay(x)
        if mask is not None:  # a padded step writes nothing and decays nothing
            keep = mask[..., None].to(x.dtype)
            beta = beta * keep
            log_alpha = log_alpha * keep if log_alpha is not None else None
        if segments is not None:  # packed rows: a segment's first token forgets the state before it
            start = segment_starts(segments)[..., None]
            base = log_alpha if log_alpha is not None else x.new_zeros(*x.shape[:2], self.n_heads)
            log_alpha = base.masked_fill(start, RESET_LOG_DECAY)
        beta = rearrange(beta, "b n h -> b h n")
        return beta, rearrange(log_alpha, "b n h -> b h n") if log_alpha is not None else None

    def _project(self, x: Tensor, mask: Tensor | None, state: DeltaState | None, segments: Tensor | None, ct):
        """q, k (b, h, n, d) unit-norm (q scaled by d^-1/2), v (b, h, n, d), beta and log alpha (b, h, n) in ``ct``."""
        qkv = self.qkv_proj(x)
        if mask is not None:
            qkv = qkv * mask[..., None].to(x.dtype)
        if self.opts.conv_size:
            qkv = self._conv(qkv, state, segments)
        beta, log_alpha = self._gates(x, mask, segments)
        return *normed_heads(qkv, self.n_heads, ct), beta.to(ct), log_alpha.to(ct) if log_alpha is not None else None

    def _lean(self, x: Tensor, mask: Tensor | None, segments: Tensor | None, ct, chunk_size: int,
              chunks_per_group: int = CHUNKS_PER_GROUP) -> Tensor:
        """The chunked form's o (b, h, n, V) by :class:`DeltaLayerRecompute` (training from a zero state)."""
        beta, log_alpha = self._gates(x, mask, segments)
        log_alpha = log_alpha if log_alpha is not None else torch.zeros_like(beta)
        keep = mask[..., None].to(x.dtype) if mask is not None else None
        conv_w = self.conv.weight if self.opts.conv_size else None
        chunk = min(chunk_size, x.shape[1])
        return DeltaLayerRecompute.apply(x, self.qkv_proj.weight, keep, conv_w, segments, beta.to(ct),
                                         log_alpha.to(ct), self.n_heads, chunk, chunks_per_group)

    def _run(self, form: str, x: Tensor, mask: Tensor | None, state: DeltaState | None,
             segments: Tensor | None = None, lean: bool = False, **kw):
        # The recurrence accumulates over the whole sequence: run it in at least fp32.
        ct = torch.promote_types(x.dtype, torch.float32)
        # The lean path re-runs the q|k|v matmul itself, and only for training.
        if lean and bare_linear(self.qkv_proj) and state is None and torch.is_grad_enabled():
            o = self._lean(x, mask, segments, ct, **kw)
        else:
            q, k, v, beta, log_alpha = self._project(x, mask, state, segments, ct)
            s0 = state.S.to(ct) if state is not None else None
            o, S = _FORMS[form](q, k, v, beta, log_alpha, s0, **kw)
            if state is not None:
                state.S = S.to(state.S.dtype)
        return self.out_proj(self._norm_gate(x, o.to(x.dtype), lean)), state

    def _norm_gate(self, x: Tensor, o: Tensor, lean: bool) -> Tensor:
        """RMS-norm per head of o (b, h, n, d), merged to (b, n, h*d), times silu(W_g x) with the output gate;
        ``lean`` (in training): by :class:`HeadNormGate`, if the gate is a plain bias-free linear."""
        gate = self.gate_proj if self.opts.output_gate else None
        if lean and torch.is_grad_enabled() and (gate is None or bare_linear(gate)):
            # rms_norm's default eps is that of the dtype it computes in (at least fp32), not the input's
            wide = torch.promote_types(o.dtype, torch.float32)
            eps = self.out_norm.eps if self.out_norm.eps is not None else torch.finfo(wide).eps
            wg = gate.weight if gate is not None else None
            return HeadNormGate.apply(o, self.out_norm.weight, eps, x if gate is not None else None, wg)
        o = self.merge_heads(self.out_norm(o))
        return o * F.silu(gate(x)) if gate is not None else o

    # ---- forms --------------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """The sequential recurrence with the explicit (I - beta k k^T) matrix product."""
        return self._run("reference", x, mask, state, pos.segments)

    def forward_chunked(self, x, *, mask, state, pos):
        """Chunkwise parallel training / prefill form (WY representation, triangular solve per chunk)."""
        return self._run("chunked", x, mask, state, pos.segments, lean=True, chunk_size=self.opts.chunk_size)

    def forward_recurrent(self, x, *, mask, state, pos):
        """O(d^2) per token recurrence; ``auto`` uses it for single-token decode steps."""
        return self._run("recurrent", x, mask, state, pos.segments)


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: the delta rule with a data-dependent scalar decay alpha_t per head (causal only).

    log alpha_t = -exp(A) * softplus(W_a x_t + dt_bias) <= 0 (Mamba2's parametrisation, computed in
    log space); output RMS-norm per head times silu(W_g x_t).
    """

    # The same family, flags and costs as DeltaNet: the decay is O(1) per step.
    capabilities = dataclasses.replace(
        DeltaNet.capabilities, paper="Gated Delta Networks: Improving Mamba2 with Delta Rule"
    )
    Options = GatedDeltaNetOptions
    gated = True

    def _init_decay(self, d_model: int, n_heads: int) -> None:
        self.alpha_proj = nn.Linear(d_model, n_heads, bias=False)
        # Mamba2's initialisation: decay rates A in [1, 16], time steps dt log-uniform in [1e-3, 1e-1].
        self.A_log = nn.Parameter(log_decay_rates(n_heads))
        self.dt_bias = nn.Parameter(inverse_softplus_dt(n_heads, 1e-3, 1e-1))

    def _log_decay(self, x: Tensor) -> Tensor:
        """log alpha (batch, seq, heads) <= 0."""
        return -self.A_log.exp() * F.softplus(self.alpha_proj(x) + self.dt_bias)
