"""Gated linear attention (GLA) and simple GLA, plus the body they share with retention.

Paper: "Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et al., 2023).
Per head, a (key_dim, value_dim) matrix state decays by a data-dependent gate and adds k v^T:

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    y = W_o (swish(W_r x) * norm(o))

GLA's gate is per key dimension, alpha_t = sigmoid(low-rank(x_t))^(1/tau); simple GLA uses one
scalar gate per head. Gates are kept as log-gates (logsigmoid / tau <= 0) so every decay is taken
in log space. All forms call :mod:`efformer.kernels.chunk_gla`: the quadratic reference, the
chunked torch form, the step loop, and the Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.kernels.chunk_gla import chunk_gla, gla_parallel, gla_recurrent
from efformer.mixers.base import (
    RESET_LOG_DECAY,
    Mixer,
    MixerOptions,
    MixerState,
    bare_linear,
    causal_recurrent,
    segment_starts,
)
from efformer.nn.positional import PositionalContext
from efformer.registry import register_mixer


@dataclass
class MatrixState(MixerState):
    """Decode state of gated linear mixers: the matrix state s (batch, heads, key_dim, value_dim)."""

    s: Tensor


class GatedLinearOptions(MixerOptions):
    """Options shared by retention, GLA and simple GLA."""

    chunk_size: int = pydantic.Field(64, gt=0, description="chunk of the chunked form (state passed between chunks)")
    sub_chunk_size: int = pydantic.Field(
        16, gt=0,
        description="inside a chunk: matmuls between sub-chunks, exact within",
    )
    norm_eps: float = pydantic.Field(1e-5, gt=0, description="eps of the per-head output group norm")


class GatedLinearMixer(Mixer):
    """Shared body: projections -> (q, k, v, log-gates) -> matrix recurrence -> group norm, swish gate.

    Subclasses set ``key_dim``/``value_dim`` (per head) and implement :meth:`_project`.
    """

    key_dim: int
    value_dim: int

    def _build(self, key_dim: int, value_dim: int) -> None:
        """Create the parts every gated linear mixer has, for per-head key/value dims."""
        o = self.opts
        if o.chunk_size % o.sub_chunk_size:
            raise ConfigError(
                f"{self.name}.chunk_size", o.chunk_size, f"a multiple of sub_chunk_size={o.sub_chunk_size}"
            )
        h, d = self.n_heads, self.d_model
        self.key_dim, self.value_dim = key_dim, value_dim
        self.q_proj = nn.Linear(d, h * key_dim, bias=False)
        self.k_proj = nn.Linear(d, h * key_dim, bias=False)
        self.v_proj = nn.Linear(d, h * value_dim, bias=False)
        self.gate_proj = nn.Linear(d, h * value_dim, bias=False)  # the swish output gate
        self.out_proj = nn.Linear(h * value_dim, d, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(h * value_dim))
        self.norm_bias = nn.Parameter(torch.zeros(h * value_dim))

    def init_state(self, batch, device, dtype) -> MatrixState:
        """A zero matrix state (kept in float32, whatever the activations' dtype)."""
        shape = (batch, self.n_heads, self.key_dim, self.value_dim)
        return MatrixState(s=torch.zeros(shape, device=device, dtype=torch.promote_types(dtype, torch.float32)))

    def kernel_dims(self) -> tuple[int, ...]:
        """The Triton kernel holds a (key_dim, value_dim) state per head."""
        return (self.key_dim, self.value_dim)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The value projection and the output projection."""
        return {"value": [self.v_proj.weight], "output": [self.out_proj.weight]}

    def _project(self, x: Tensor, pos: PositionalContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q (scaled, rotated), k, g (b, h, n, key_dim | 1) and v (b, h, n, value_dim)."""
        raise NotImplementedError

    def _inputs(self, x, mask, pos):
        q, k, v, g = self._project(x, pos)
        if mask is not None:
            # A padded step must leave the state unchanged: gate 1 (log-gate 0) and no k v^T added.
            keep = mask[:, None, :, None].to(k.dtype)
            k, v, g = k * keep, v * keep, g * keep
        if pos.segments is not None:  # packed rows: a segment's first token forgets the state before it
            g = g.masked_fill(segment_starts(pos.segments)[:, None, :, None], RESET_LOG_DECAY)
        return q, k, v, g

    def _gated_norm(self, x: Tensor, o: Tensor) -> Tensor:
        """swish(W_r x) * group_norm(o) (b, n, h*v) by plain autograd: group norm over each head's output."""
        b, n = x.shape[:2]
        o = rearrange(o, "b h n v -> (b n) (h v)")
        dt = torch.promote_types(self.norm_weight.dtype, torch.float32)  # normalise in at least fp32
        w, bias = self.norm_weight.to(dt), self.norm_bias.to(dt)
        o = F.group_norm(o.to(dt), self.n_heads, w, bias, self.opts.norm_eps)
        return F.silu(self.gate_proj(x)) * o.view(b, n, -1).to(x.dtype)

    def _finish(self, x: Tensor, o: Tensor, lean: bool = True) -> Tensor:
        """Gated group norm, then the output projection; ``lean``: the norm by :class:`GatedGroupNorm`."""
        if lean and torch.is_grad_enabled() and bare_linear(self.gate_proj):  # the lean norm re-runs the gate matmul
            w = self.gate_proj.weight
            y = GatedGroupNorm.apply(x, w, o, self.norm_weight, self.norm_bias, self.opts.norm_eps)
        else:
            y = self._gated_norm(x, o)
        return self.out_proj(y)

    def _run(self, fn, x, mask, state, pos, lean=True):
        o, s = fn(*self._inputs(x, mask, pos), state.s if state is not None else None)
        if state is not None:
            state.s = s.to(state.s.dtype)
        return self._finish(x, o, lean), state

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Parallel quadratic form: scores (q k^T) * D, D[t, s] = exp(G_t - G_s) for s <= t."""
        return self._run(gla_parallel, x, mask, state, pos, lean=False)

    def forward_chunked(self, x, *, mask, state, pos):
        """Chunked torch form: O(N C d) time, O(N d) memory beyond the (C, C) chunk scores."""
        fn = partial(chunk_gla, chunk_size=self.opts.chunk_size, sub_chunk=self.opts.sub_chunk_size, backend="torch")
        return self._run(fn, x, mask, state, pos)

    def forward_recurrent(self, x, *, mask, state, pos):
        """Step loop over the matrix state (the decode form)."""
        return self._run(gla_recurrent, x, mask, state, pos)

    def forward_triton(self, x, *, mask, state, pos):
        """The chunkwise Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
        return self._run(partial(chunk_gla, backend="triton"), x, mask, state, pos)


def _normalised(o: Tensor, eps: float, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """o (b, h, n, v) normalised over each head's v values, as (b, n, h, v) in ``dt``, and 1/std (b, n, h, 1)."""
    on = o.transpose(1, 2).to(dt)
    var, mean = torch.var_mean(on, -1, correction=0, keepdim=True)
    rstd = (var + eps).rsqrt()
    return (on - mean).mul_(rstd), rstd


class GatedGroupNorm(torch.autograd.Function):
    """swish(x W_r^T) * group_norm(o) -> (b, n, h*v), for x (b, n, d), W_r (h*v, d), o (b, h, n, v).

    Keeps only its inputs for backward (x and o are kept by the layer anyway) and rebuilds the gate
    and the normalised o there, in place where it can: autograd would keep four (b, n, h*v)
    intermediates, as much as the whole chunked recurrence keeps.
    """

    @staticmethod
    def forward(ctx, x, wr, o, w, bias, eps):
        dt = torch.promote_types(torch.promote_types(o.dtype, w.dtype), torch.float32)
        xhat, _ = _normalised(o, eps, dt)
        y = xhat.flatten(-2).mul_(w.to(dt)).add_(bias.to(dt)).mul_(F.silu(F.linear(x, wr).to(dt)))
        ctx.save_for_backward(x, wr, o, w, bias)
        ctx.eps, ctx.dt = eps, dt
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, wr, o, w, bias = ctx.saved_tensors
        dt = ctx.dt
        dy = dy.to(dt)
        z = F.linear(x, wr).to(dt)
        sig = torch.sigmoid(z)
        # The gate's side first, so that at most five (b, n, h*v) buffers are alive at once.
        dz = _normalised(o, ctx.eps, dt)[0].flatten(-2).mul_(w.to(dt)).add_(bias.to(dt)).mul_(dy).mul_(sig)
        dz.mul_(torch.sub(1, sig).mul_(z).add_(1))  # swish'(z) = sig (1 + z (1 - sig))
        dz = dz.to(x.dtype)
        dx = dz @ wr.to(dz.dtype) if ctx.needs_input_grad[0] else None
        dwr = dz.flatten(0, -2).transpose(0, 1) @ x.flatten(0, -2) if ctx.needs_input_grad[1] else None
        del dz
        dn = z.mul_(sig).mul_(dy)  # d(norm output) = dy * swish(z)
        del sig
        xhat, rstd = _normalised(o, ctx.eps, dt)
        dw, dbias = (dn * xhat.flatten(-2)).sum((0, 1)), dn.sum((0, 1))
        dxh = dn.mul_(w.to(dt)).view_as(xhat)
        proj = (dxh * xhat).mean(-1, keepdim=True)
        do = dxh.sub_(dxh.mean(-1, keepdim=True)).sub_(xhat.mul_(proj)).mul_(rstd)
        return dx, dwr, do.transpose(1, 2).to(o.dtype), dw.to(w.dtype), dbias.to(bias.dtype), None


_FORMS = ("reference", "chunked", "recurrent", "triton")


class GLAOptions(GatedLinearOptions):
    """Options of gated linear attention."""

    expand_k: float = pydantic.Field(0.5, gt=0, description="key dim = expand_k * d_model (the paper halves it)")
    expand_v: float = pydantic.Field(1.0, gt=0, description="value dim = expand_v * d_model")
    gate_low_rank: int = pydantic.Field(16, gt=0, description="rank of the gate projection x -> alpha")
    gate_logit_normalizer: float = pydantic.Field(16.0, gt=0, description="tau: alpha = sigmoid(.)^(1/tau), near 1")


def _head_dim(mixer: Mixer, field: str, expand: float) -> int:
    total = int(mixer.d_model * expand)
    if total <= 0 or total % mixer.n_heads:
        raise ConfigError(
            f"{mixer.name}.{field}", expand, f"d_model*{field}={total} must be a positive multiple of n_heads"
        )
    return total // mixer.n_heads


@register_mixer("gla")
class GatedLinearAttention(GatedLinearMixer):
    """GLA: linear attention whose matrix state decays by data-dependent per-key-dim gates."""

    capabilities = causal_recurrent(
        paper="Gated Linear Attention Transformers with Hardware-Efficient Training",
        time="O(N C d + N d^2) chunked, O(N d^2) recurrent",
        memory="O(N d + d^2) per head",
        forms=_FORMS,
        packing=True,  # a reset gate at each segment start
        # Per-dim decays do not commute with rotations of dim pairs, so RoPE would not stay relative.
        rotary=False,
    )
    Options = GLAOptions
    test_options = {"chunk_size": 4, "sub_chunk_size": 2, "gate_low_rank": 4}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        self._build(_head_dim(self, "expand_k", o.expand_k), _head_dim(self, "expand_v", o.expand_v))
        self.gate_down = nn.Linear(d_model, o.gate_low_rank, bias=False)
        self.gate_up = nn.Linear(o.gate_low_rank, n_heads * self.key_dim, bias=True)

    def _project(self, x, pos):
        q = self.split_heads(self.q_proj(x)) * self.key_dim**-0.5
        k, v = self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))
        g = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.opts.gate_logit_normalizer
        return q, k, v, self.split_heads(g)


class SimpleGLAOptions(GatedLinearOptions):
    """Options of simple GLA (one scalar data-dependent gate per head)."""

    expand_k: float = pydantic.Field(1.0, gt=0, description="key dim = expand_k * d_model")
    expand_v: float = pydantic.Field(1.0, gt=0, description="value dim = expand_v * d_model")
    gate_logit_normalizer: float = pydantic.Field(16.0, gt=0, description="tau: alpha = sigmoid(.)^(1/tau)")


@register_mixer("simple_gla")
class SimpleGLA(GatedLinearMixer):
    """Simple GLA: the GLA recurrence with one data-dependent scalar gate per head and step."""

    capabilities = causal_recurrent(
        paper="Gated Linear Attention Transformers with Hardware-Efficient Training",
        time="O(N C d + N d^2) chunked, O(N d^2) recurrent",
        memory="O(N d + d^2) per head",
        forms=_FORMS,
        packing=True,  # a reset gate at each segment start
        rotary=True,  # a scalar decay commutes with rotations, so RoPE stays relative
    )
    Options = SimpleGLAOptions
    test_options = {"chunk_size": 4, "sub_chunk_size": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        self._build(_head_dim(self, "expand_k", o.expand_k), _head_dim(self, "expand_v", o.expand_v))
        self.gate = nn.Linear(d_model, n_heads, bias=True)

    def _project(self, x, pos):
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        q, k = pos.rotate_queries(q), pos.rotate_keys(k)
        g = F.logsigmoid(self.gate(x)) / self.opts.gate_logit_normalizer  # (b, n, h)
        return q * self.key_dim**-0.5, k, self.split_heads(self.v_proj(x)), rearrange(g, "b n h -> b h n 1")
