"""H3: a shift SSM and a diagonal SSM joined by multiplicative query/key/value interactions.

Paper: "Hungry Hungry Hippos: Towards Language Modeling with State Space Models" (Fu, Dao, Saab,
Thomas, Rudra & Re, ICLR 2023).

``q, k, v = x W_q, x W_k, x W_v``; ``k~ = SSM_shift(k)`` (a shift-matrix SSM: its output is a learned
causal convolution over the last ``shift_size`` keys, so k~ remembers which tokens came just before);
per head of width d_h, the outer products ``k~_t v_t^T`` (d_h x d_h) run through a diagonal SSM
``S = SSM_diag(k~ v^T)`` (S4D-Lin modes, zero-order hold, a D skip), whose long memory holds them;
the output is ``y_t = q_t^T S_t`` per head, then a linear projection. With ``head_dim = 1`` this is the
paper's ``q * SSM_diag(SSM_shift(k) * v)``. The shift then diagonal pair is what lets H3 compare a
token with the tokens before it (associative recall), which a diagonal SSM alone cannot.

Forms: "fast" runs both SSMs as FFT convolutions (the FlashConv algorithm's maths, in torch);
"reference" runs the shift SSM as a direct convolution and the diagonal SSM as its recurrence;
"recurrent" feeds tokens one at a time through the decode state (the shift window and the SSM state).

Padding: keys and values at padded positions are zeroed, so a pad writes nothing into either SSM
(a left pad leaves both states at zero, as in the unpadded row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Mixer, MixerOptions, MixerState, causal_recurrent
from efformer.mixers.s4d import _wide, carried_state, cexp, fft_conv, recurrence, ssm_kernel
from efformer.registry import register_mixer


@dataclass
class H3State(MixerState):
    """Decode state: the last ``shift_size - 1`` keys (batch, d_model, shift_size - 1) and the diagonal
    SSM state as a real view (batch, d_model * head_dim, d_state // 2, 2)."""

    conv: Tensor
    h: Tensor


class H3Options(MixerOptions):
    """Options of H3."""

    d_state: int = Field(64, ge=2, description="N of the diagonal SSM: N // 2 complex conjugate-pair modes")
    shift_size: int = Field(64, ge=1, le=4096,
                            description="state size of the shift SSM: its convolution spans this many keys")
    head_dim: int = Field(1, ge=1, description="d_h: per-head width; each head's SSM holds d_h x d_h outer products "
                                               "(must divide d_model)")
    dt_min: float = Field(0.001, gt=0, description="initial log_dt is uniform in [log dt_min, log dt_max]")
    dt_max: float = Field(0.1, gt=0, description="upper end of the initial step sizes")


@register_mixer("h3")
class H3(Mixer):
    """H3: q * SSM_diag(SSM_shift(k) v^T) per head, with both SSMs as FFT convolutions; causal."""

    capabilities = causal_recurrent(
        paper="Hungry Hungry Hippos: Towards Language Modeling with State Space Models",
        family="ssm",
        time="O(N d_model head_dim (d_state + log N))",
        memory="O(N d_model head_dim d_state) for the Vandermonde kernel, O(d_model head_dim d_state) decode state",
        forms=("reference", "fast", "recurrent"),
    )
    Options = H3Options
    test_options = {"d_state": 8, "shift_size": 4, "head_dim": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)  # heads are set by head_dim, as in the paper
        o = self.opts
        if d_model % o.head_dim:
            raise ConfigError("h3.head_dim", o.head_dim, f"must divide d_model={d_model}")
        if o.dt_min > o.dt_max:
            raise ConfigError("h3.dt_min", o.dt_min, f"must not exceed dt_max={o.dt_max}")
        self.channels, self.modes = d_model * o.head_dim, o.d_state // 2
        e, m = self.channels, self.modes
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        # the shift SSM's C: shift_kernel[:, l] weighs the key l steps back (lag 0 is the current key)
        self.shift_kernel = nn.Parameter(torch.randn(d_model, o.shift_size) / math.sqrt(o.shift_size))
        self.log_dt = nn.Parameter(torch.rand(e) * (math.log(o.dt_max) - math.log(o.dt_min)) + math.log(o.dt_min))
        self.log_A_real = nn.Parameter(torch.full((e, m), math.log(0.5)))
        self.A_imag = nn.Parameter((math.pi * torch.arange(m, dtype=torch.float32)).repeat(e, 1))  # S4D-Lin
        self.B = nn.Parameter(torch.view_as_real(torch.ones(e, m, dtype=torch.cfloat)))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(e, m, dtype=torch.cfloat) * math.sqrt(0.5)))
        self.D = nn.Parameter(torch.randn(e))
        self.out_proj = nn.Linear(d_model, d_model)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The value rows of the fused q/k/v projection; the output projection."""
        return {"value": [self.in_proj.weight[2 * self.d_model :]], "output": [self.out_proj.weight]}

    def init_state(self, batch, device, dtype) -> H3State:
        """Zero shift window and zero diagonal SSM state."""
        return H3State(conv=torch.zeros(batch, self.d_model, self.opts.shift_size - 1, device=device, dtype=dtype),
                       h=torch.zeros(batch, self.channels, self.modes, 2, device=device, dtype=dtype))

    # ---- shared parts ---------------------------------------------------------------------
    def _discretise(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dt*A, A_bar, B_bar and C (E, M) of the diagonal SSM (zero-order hold), in at least float32."""
        log_a_real, a_imag, log_dt, b, c = (_wide(p) for p in (self.log_A_real, self.A_imag, self.log_dt, self.B,
                                                                 self.C))
        a = torch.complex(-torch.exp(log_a_real), a_imag)
        dt_a = a * torch.exp(log_dt)[:, None]
        a_bar = cexp(dt_a)
        return dt_a, a_bar, (a_bar - 1) / a * torch.view_as_complex(b), torch.view_as_complex(c)

    def _begin(self, x, mask, state):
        """q, k, v (b, L, d) in at least float32 (k, v zero at pads); the carried keys then this call's keys
        (b, d, shift_size - 1 + L); the SSM state (None without a decode state)."""
        q, k, v = _wide(self.in_proj(x)).chunk(3, dim=-1)
        if mask is not None:
            keep = mask[..., None].to(k.dtype)
            k, v = k * keep, v * keep
        if state is None:
            conv, h = k.new_zeros(x.shape[0], self.d_model, self.opts.shift_size - 1), None
        else:
            conv, h = _wide(state.conv), torch.view_as_complex(_wide(state.h).contiguous())
        return q, v, torch.cat([conv, k.transpose(1, 2)], dim=-1), h

    def _outer(self, k_shift: Tensor, v: Tensor) -> Tensor:
        """Per-head outer products k~ v^T: (b, L, d) twice -> (b, L, E) with E = d * head_dim."""
        d = self.opts.head_dim
        kk, vv = (rearrange(t, "b l (h d) -> b l h d", d=d) for t in (k_shift, v))
        return (kk[..., :, None] * vv[..., None, :]).flatten(2)

    def _end(self, q, s, u, state, keys, h, dtype):
        """y = q^T (S + D u) per head, projected; the state updated (the shift window: the last keys)."""
        d = self.opts.head_dim
        s = rearrange(s + u * _wide(self.D), "b l (h i j) -> b l h i j", i=d, j=d)
        y = torch.einsum("blhi,blhij->blhj", rearrange(q, "b l (h d) -> b l h d", d=d), s).flatten(2)
        if state is not None:
            state.conv = keys[..., keys.shape[-1] - state.conv.shape[-1] :].to(state.conv.dtype)
            state.h = torch.view_as_real(h).to(state.h.dtype)
        return self.out_proj(y.to(dtype)), state

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Shift SSM as a direct causal convolution, diagonal SSM as its step-by-step recurrence."""
        q, v, keys, h0 = self._begin(x, mask, state)
        kernel = _wide(self.shift_kernel)
        k_shift = F.conv1d(keys, kernel.flip(-1)[:, None], groups=self.d_model).transpose(1, 2)
        u = self._outer(k_shift, v)
        _, a_bar, b_bar, c = self._discretise()
        if h0 is None:
            h0 = torch.zeros(x.shape[0], self.channels, self.modes, dtype=a_bar.dtype, device=x.device)
        s, h = recurrence(u, a_bar, b_bar, c, h0)
        return self._end(q, s, u, state, keys, h, x.dtype)

    def forward_fast(self, x, *, mask, state, pos):
        """Both SSMs as FFT convolutions; a carried SSM state enters in closed form."""
        q, v, keys, h0 = self._begin(x, mask, state)
        n, total = x.shape[1], keys.shape[-1]
        kernel = _wide(self.shift_kernel)[:, :total]  # lags past the carried keys never reach an output
        kernel = F.pad(kernel, (0, total - kernel.shape[-1]))
        k_shift = fft_conv(keys, kernel)[..., total - n :].transpose(1, 2)
        u = self._outer(k_shift, v)
        dt_a, a_bar, b_bar, c = self._discretise()
        ut = u.transpose(1, 2)  # (b, E, L)
        s = fft_conv(ut, ssm_kernel(c[None] * b_bar, dt_a, n)[0])
        h = None
        if h0 is not None:
            carried, h = carried_state(ut, dt_a, a_bar, b_bar, c, h0)
            s = s + carried
        return self._end(q, s.transpose(1, 2), u, state, keys, h, x.dtype)

    def forward_recurrent(self, x, *, mask, state, pos):
        """One token at a time: the shift window slides over the keys, the diagonal SSM steps."""
        q, v, keys, h = self._begin(x, mask, state)
        _, a_bar, b_bar, c = self._discretise()
        if h is None:
            h = torch.zeros(x.shape[0], self.channels, self.modes, dtype=a_bar.dtype, device=x.device)
        taps, w = _wide(self.shift_kernel).flip(-1), self.opts.shift_size
        ss, us = [], []
        for t in range(x.shape[1]):
            k_shift = (keys[..., t : t + w] * taps).sum(-1)  # the window ending at token t
            u = self._outer(k_shift[:, None], v[:, t : t + 1])
            s, h = recurrence(u, a_bar, b_bar, c, h)
            ss.append(s)
            us.append(u)
        return self._end(q, torch.cat(ss, 1), torch.cat(us, 1), state, keys, h, x.dtype)
