"""S4D: diagonal state-space layer with a convolution kernel computed by a Vandermonde product.

Paper: "On the Parameterization and Initialization of Diagonal State Space Models" (Gu, Gupta,
Goel & Re, 2022).

Each of the d_model channels is an independent linear time-invariant SSM with N/2 complex diagonal
modes (their conjugates are implied, so outputs are ``2 Re``): ``h_t = A_bar h_{t-1} + B_bar u_t``,
``y_t = 2 Re(C h_t) + D u_t``, discretised by zero-order hold with a learned step per channel
(``A_bar = exp(dt A)``, ``B_bar = (exp(dt A) - 1) / A * B``). Unrolled, this is a causal convolution
with kernel ``K[l] = 2 Re(sum_n C_n B_bar_n A_bar_n^l)``, a Vandermonde product.

Forms: "fast" builds K and convolves by FFT (O(N log N)); "reference" is the sequential recurrence;
"recurrent" feeds tokens one at a time through the decode state. A bidirectional layer
(``causal=False``) adds a second kernel run over the reversed sequence (its own C), as for LRA.

Padding: padded inputs are zeroed. Being time-invariant, the layer cannot skip a step, so a pad is a
zero input: a LEFT pad (causal) or a RIGHT pad seen by the backward direction leaves the zero
starting state at zero, hence those rows compute exactly what the unpadded row computes; a hole
inside a row lets the state decay for one step without input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions, MixerState
from efformer.registry import register_mixer


def cexp(z: Tensor) -> Tensor:
    """exp of a complex tensor as exp(Re z) * (cos Im z + i sin Im z): real ops, ~10x faster than
    complex exp on CPU (the Vandermonde kernel was 84% of S4D's time), same values and gradients."""
    return torch.polar(torch.exp(z.real), z.imag)


@dataclass
class S4DState(MixerState):
    """Decode state: the complex diagonal state stored as a real view (batch, d_model, d_state // 2, 2)."""

    h: Tensor


class S4DOptions(MixerOptions):
    """Options of S4D."""

    d_state: int = Field(64, ge=2, description="N: state size per channel; N // 2 complex conjugate-pair modes")
    init: Literal["lin", "inv"] = Field(
        "lin",
        description="S4D-Lin: A_n = -1/2 + i pi n; S4D-Inv: -1/2 + i N/pi (N/(2n+1) - 1)",
    )
    dt_min: float = Field(0.001, gt=0, description="initial log_dt is uniform in [log dt_min, log dt_max]")
    dt_max: float = Field(0.1, gt=0, description="upper end of the initial step sizes")


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 unless it is already float64."""
    return t if t.dtype == torch.float64 else t.float()


def recurrence(u: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The SSM step by step: u (b, L, H) real; a_bar, b_bar, c (H, M); h (b, H, M) complex -> y (b, L, H), h."""
    ys = []
    for t in range(u.shape[1]):
        h = a_bar * h + b_bar * u[:, t, :, None]
        ys.append(2 * (c * h).sum(-1).real)
    return torch.stack(ys, 1), h


def ssm_kernel(w: Tensor, dt_a: Tensor, n: int) -> Tensor:
    """K[..., h, l] = 2 Re(sum_m w[..., h, m] exp(l dt_a[h, m])) for l < n: the SSM's convolution kernel.

    w (directions, H, M) and dt_a (H, M) complex -> K (directions, H, n) real. Powers are split as
    A^(cB + j) = A^(cB) A^j with B ~ sqrt(n), so only (H, M, B) and (H, M, n/B) exponentials are
    formed and the sum over modes is one batched real matmul per direction: O(H n M) multiply-adds
    in a matmul instead of an (H, M, n) complex tensor (and its backward) of exponentials.
    """
    block = max(1, math.isqrt(n))
    blocks = -(-n // block)
    steps = torch.arange(block, device=dt_a.device, dtype=dt_a.real.dtype)
    inner = cexp(dt_a[..., None] * steps)  # (H, M, B): A^j
    outer = cexp(dt_a[..., None] * (steps.new_tensor(range(blocks)) * block))  # (H, M, C): A^(cB)
    p = (w[..., None] * outer).transpose(-1, -2)  # (directions, H, C, M): w A^(cB)
    # Re((pr + i pi)(ir + i ii)) = pr ir - pi ii, summed over m: two real matmuls (one, stacked).
    left = torch.cat([p.real, -p.imag], dim=-1)  # (directions, H, C, 2M)
    right = torch.cat([inner.real, inner.imag], dim=-2)  # (H, 2M, B)
    k = 2 * (left @ right)  # (directions, H, C, B)
    return k.flatten(-2)[..., :n]


def fft_conv(u: Tensor, k: Tensor) -> Tensor:
    """Causal convolution of u (b, H, L) with kernel k (H, L) by zero-padded FFT (no wrap-around)."""
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]]


def carried_state(ut: Tensor, dt_a: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor,
                  h0: Tensor) -> tuple[Tensor, Tensor]:
    """A diagonal SSM's carried state in closed form: what h0 (b, H, M) adds to the outputs of a call on
    ut (b, H, L), namely 2 Re(C A_bar^(l+1) h0) at step l, and the state after the call (b, H, M)."""
    n = ut.shape[-1]
    vander = cexp(dt_a[..., None] * torch.arange(n, device=ut.device))  # (H, M, L): A_bar^l
    y = 2 * torch.einsum("hm,bhm,hml->bhl", c, h0 * a_bar, vander).real
    written = torch.einsum("bhl,hml->bhm", ut.to(vander.dtype), vander.flip(-1)) * b_bar
    return y, h0 * cexp(dt_a * n) + written


@register_mixer("s4d")
class S4D(Mixer):
    """S4D: per-channel diagonal complex SSM as an FFT long convolution, GELU and a GLU output projection."""

    capabilities = Capabilities(
        family="ssm",
        paper="On the Parameterization and Initialization of Diagonal State Space Models",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N d_model (d_state + log N))",
        memory="O(N d_model d_state) for the Vandermonde kernel, O(d_model d_state) decode state",
        forms=("reference", "fast", "recurrent"),
    )
    Options = S4DOptions
    test_options = {"d_state": 8}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)  # n_heads is accepted but unused: channels are independent
        o = self.opts
        if o.dt_min > o.dt_max:
            raise ConfigError("s4d.dt_min", o.dt_min, f"must not exceed dt_max={o.dt_max}")
        h, m = d_model, o.d_state // 2
        self.modes = m
        self.log_dt = nn.Parameter(torch.rand(h) * (math.log(o.dt_max) - math.log(o.dt_min)) + math.log(o.dt_min))
        self.log_A_real = nn.Parameter(torch.full((h, m), math.log(0.5)))
        n = torch.arange(m, dtype=torch.float32)
        imag = math.pi * n if o.init == "lin" else o.d_state / math.pi * (o.d_state / (2 * n + 1) - 1)
        self.A_imag = nn.Parameter(imag.repeat(h, 1))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(h, m, dtype=torch.cfloat)))
        # One C per direction: the backward kernel of a bidirectional layer is a second SSM output map.
        self.C = nn.Parameter(torch.view_as_real(torch.randn(1 if self.causal else 2, h, m, dtype=torch.cfloat)))
        self.D = nn.Parameter(torch.randn(h))
        self.out_proj = nn.Linear(h, 2 * h)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """No value projection (the SSM reads x itself); the GLU output projection."""
        return {"value": [], "output": [self.out_proj.weight]}

    def init_state(self, batch, device, dtype) -> S4DState:
        """A zero state (causal layers only: a bidirectional layer reads the future)."""
        if not self.causal:
            raise CapabilityError(f"{self.name}: a bidirectional (causal=False) layer has no decode state; "
                                  "use causal=True")
        return S4DState(h=torch.zeros(batch, self.d_model, self.modes, 2, device=device, dtype=dtype))

    # ---- shared parts ---------------------------------------------------------------------
    _scan = staticmethod(recurrence)  # the step-by-step SSM (S4 swaps in its dense-matrix one)

    def _discretise(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Complex dt*A, A_bar, B_bar (H, M) by zero-order hold, and C (directions, H, M)."""
        # The SSM runs in at least float32 (complex half precision is barely supported and too coarse).
        log_a_real, a_imag, log_dt, b, c = (
            _wide(p) for p in (self.log_A_real, self.A_imag, self.log_dt, self.B, self.C)
        )
        a = torch.complex(-torch.exp(log_a_real), a_imag)
        dt_a = a * torch.exp(log_dt)[:, None]
        a_bar = cexp(dt_a)
        return dt_a, a_bar, (a_bar - 1) / a * torch.view_as_complex(b), torch.view_as_complex(c)

    def kernel(self, n: int) -> Tensor:
        """The convolution kernel K (directions, H, n), by the blocked Vandermonde product."""
        dt_a, _, b_bar, c = self._discretise()
        return ssm_kernel(c * b_bar, dt_a, n)

    def _carry(self, ut: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """What the carried state h0 adds to the outputs (b, H, L) of a call on ut (b, H, L), and the state after."""
        dt_a, a_bar, b_bar, c = self._discretise()
        return carried_state(ut, dt_a, a_bar, b_bar, c[0], h0)

    def _begin(self, x, mask, state):
        if state is not None and not self.causal:
            raise CapabilityError(f"{self.name}: a bidirectional (causal=False) layer has no decode state; "
                                  "use causal=True")
        u = _wide(x if mask is None else x * mask[..., None].to(x.dtype))  # a pad is a zero input
        h0 = None if state is None else torch.view_as_complex(_wide(state.h).contiguous())
        return u, h0

    def _end(self, y, u, state, h):
        if state is not None:
            state.h = torch.view_as_real(h).to(state.h.dtype)
        y = F.gelu(y + u * self.D).to(self.out_proj.weight.dtype)
        return F.glu(self.out_proj(y), dim=-1), state

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """The discretised recurrence one step at a time (and over the reversed sequence if bidirectional)."""
        u, h0 = self._begin(x, mask, state)
        _, a_bar, b_bar, c = self._discretise()
        zero = torch.zeros(x.shape[0], self.d_model, self.modes, dtype=a_bar.dtype, device=x.device)
        y, h = self._scan(u, a_bar, b_bar, c[0], zero if h0 is None else h0)
        if not self.causal:
            y = y + self._scan(u.flip(1), a_bar, b_bar, c[1], zero)[0].flip(1)
        return self._end(y, u, state, h)

    def forward_fast(self, x, *, mask, state, pos):
        """Kernel K by a Vandermonde product, convolution by FFT; a decode state enters in closed form."""
        u, h0 = self._begin(x, mask, state)
        k = self.kernel(x.shape[1])  # (directions, H, L)
        ut = u.transpose(1, 2)  # (b, H, L)
        y = fft_conv(ut, k[0])
        if not self.causal:
            y = y + fft_conv(ut.flip(-1), k[1]).flip(-1)
        h = None
        if h0 is not None:
            carried, h = self._carry(ut, h0)
            y = y + carried
        return self._end(y.transpose(1, 2), u, state, h)

    def forward_recurrent(self, x, *, mask, state, pos):
        """Token by token through the decode state (a bidirectional layer has none: it runs the reference)."""
        if not self.causal:
            return self.forward_reference(x, mask=mask, state=state, pos=pos)
        u, h = self._begin(x, mask, state)
        _, a_bar, b_bar, c = self._discretise()
        if h is None:
            h = torch.zeros(x.shape[0], self.d_model, self.modes, dtype=a_bar.dtype, device=x.device)
        ys = []
        for t in range(x.shape[1]):
            y, h = self._scan(u[:, t : t + 1], a_bar, b_bar, c[0], h)
            ys.append(y)
        return self._end(torch.cat(ys, 1), u, state, h)
