"""LMU / LMUFormer: the Legendre Memory Unit as a token mixer, trained in its parallel (convolution) form.

Papers: "Legendre Memory Units: Continuous-Time Representation in Recurrent Neural Networks" (Voelker,
Kajic & Eliasmith, NeurIPS 2019); "Parallelizing Legendre Memory Unit Training" (Chilkuri & Eliasmith,
ICML 2021); "LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory Units" (Liu,
Datta, Srinivasan, Sengupta, Roy & Jaiswal, ICLR 2024).

Each of ``channels`` encoded inputs ``u_t = x_t W_u`` drives an order-d memory that solves
``theta m'(t) = A m(t) + B u(t)`` with the paper's closed form
``A_ij = (2i + 1) * (-1 if i < j else (-1)^(i - j + 1))``, ``B_i = (2i + 1) (-1)^i``, whose state holds
the Legendre coefficients of the last theta steps of u (so ``u(t - r theta) ~ sum_i P~_i(r) m_i(t)``,
P~ the shifted Legendre polynomials). Zero-order hold with step 1 gives ``m_t = A_bar m_(t-1) + B_bar u_t``.
A and B are fixed, as in the papers; the layer learns the encoder and ``y = W_o GELU(W_m m_t + W_x x_t)``.
With no hidden-state feedback into u (the parallel LMU, which LMUFormer uses), the memory is a linear
time-invariant system: ``m_t = sum_l A_bar^l B_bar u_(t-l)``, an FFT convolution.

Forms: "fast" is that convolution (a carried state adds ``A_bar^(t+1) m_0``); "reference" is the
recurrence step by step, which is also how it decodes (there is no separate recurrent form).

What we chose where the papers leave room: ``channels`` memories (default n_heads) instead of LMU's one
scalar input; ``theta`` defaults to max_len; the hidden width is d_model; the spiking neurons and the
convolutional patch embedding of LMUFormer are not part of the mixer.

Padding: the encoded input is zero at pads, so a left pad leaves the memory at zero.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from efformer.mixers.base import Mixer, MixerOptions, MixerState, causal_recurrent
from efformer.mixers.s4 import powers_applied
from efformer.mixers.s4d import _wide, fft_conv
from efformer.registry import register_mixer


@functools.lru_cache(maxsize=16)
def legendre_memory(order: int, theta: float) -> tuple[Tensor, Tensor]:
    """The LMU's continuous A (d, d) and B (d,) over theta = 1, and their zero-order hold with step 1
    over window theta: returns (A_bar (d, d), B_bar (d,)) in float64."""
    a, b = legendre_ab(order)
    aug = torch.zeros(order + 1, order + 1, dtype=torch.float64)
    aug[:order, :order], aug[:order, order] = a / theta, b / theta
    e = torch.linalg.matrix_exp(aug)  # [[exp(A/theta), int_0^1 exp(A s/theta) ds B/theta], [0, 1]]
    return e[:order, :order], e[:order, order]


def legendre_ab(order: int) -> tuple[Tensor, Tensor]:
    """The closed-form LMU matrices A (d, d) and B (d,) in float64 (Voelker et al., eq. 2)."""
    i = torch.arange(order, dtype=torch.float64)[:, None]
    j = torch.arange(order, dtype=torch.float64)[None, :]
    sign = torch.where(i < j, -torch.ones(()), (-1.0) ** (i - j + 1))
    return (2 * i + 1) * sign, (2 * i[:, 0] + 1) * (-1.0) ** i[:, 0]


def shifted_legendre(order: int, r: Tensor) -> Tensor:
    """P~_i(r) for i < order at points r (...,) in [0, 1] -> (..., order); P~_i(r) = P_i(2r - 1)."""
    x = 2 * r - 1
    out = [torch.ones_like(x), x]
    for n in range(1, order - 1):  # Bonnet: (n + 1) P_(n+1) = (2n + 1) x P_n - n P_(n-1)
        out.append(((2 * n + 1) * x * out[-1] - n * out[-2]) / (n + 1))
    return torch.stack(out[:order], -1)


@dataclass
class LMUState(MixerState):
    """Decode state: the Legendre memory (batch, channels, order)."""

    m: Tensor


class LMUOptions(MixerOptions):
    """Options of the LMU mixer."""

    order: int = Field(32, ge=1, le=512, description="d: Legendre coefficients kept per memory channel")
    theta: float | None = Field(None, gt=0, description="the window (in tokens) the memory represents; "
                                                        "None: max_len")
    channels: int | None = Field(None, ge=1, le=4096, description="memories (encoded inputs), each of order d; "
                                                                  "None: n_heads")


@register_mixer("lmu")
class LMU(Mixer):
    """LMU (parallel form, as in LMUFormer): fixed Legendre memories of encoded inputs, then a GELU hidden layer."""

    capabilities = causal_recurrent(
        paper="Legendre Memory Units: Continuous-Time Representation in Recurrent Neural Networks",
        family="ssm",
        time="O(N channels order (order + log N))",
        memory="O(N channels order) for the memory, O(channels order) decode state",
        forms=("reference", "fast"),  # the reference is the recurrence, and it is also the decode step
    )
    Options = LMUOptions
    test_options = {"order": 6, "theta": 8.0}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        self.order, self.theta = o.order, float(o.theta or self.max_len)
        self.n_channels = o.channels or n_heads
        self.encoder = nn.Linear(d_model, self.n_channels)
        self.mem_proj = nn.Linear(self.n_channels * self.order, d_model, bias=False)
        self.in_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The input and memory maps of the hidden layer carry the values; the output projection."""
        return {"value": [self.in_proj.weight, self.mem_proj.weight], "output": [self.out_proj.weight]}

    def init_state(self, batch, device, dtype) -> LMUState:
        """A zero memory."""
        return LMUState(m=torch.zeros(batch, self.n_channels, self.order, device=device, dtype=dtype))

    def system(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """A_bar (d, d) and B_bar (d,) on ``like``'s device in at least float32 (kept out of the module's
        buffers so that casting the model to bfloat16 never rounds the fixed memory)."""
        a_bar, b_bar = legendre_memory(self.order, self.theta)
        dtype = _wide(like).dtype
        return a_bar.to(like.device, dtype), b_bar.to(like.device, dtype)

    def _begin(self, x, mask, state):
        u = _wide(self.encoder(x))  # (b, L, channels)
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)
        return u, None if state is None else _wide(state.m)

    def _end(self, x, m, state, last):
        """y = W_o GELU(W_m m + W_x x) from the memories m (b, L, channels, d); the state updated."""
        if state is not None:
            state.m = last.to(state.m.dtype)
        dtype = self.out_proj.weight.dtype
        hidden = F.gelu(self.mem_proj(m.flatten(2).to(dtype)) + self.in_proj(x))
        return self.out_proj(hidden), state

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """The memory recurrence m_t = A_bar m_(t-1) + B_bar u_t, one step at a time."""
        u, m = self._begin(x, mask, state)
        a_bar, b_bar = self.system(u)
        m = u.new_zeros(x.shape[0], self.n_channels, self.order) if m is None else m
        ms = []
        for t in range(x.shape[1]):
            m = m @ a_bar.T + u[:, t, :, None] * b_bar
            ms.append(m)
        return self._end(x, torch.stack(ms, 1), state, m)

    def forward_fast(self, x, *, mask, state, pos):
        """The memory as an FFT convolution with the impulse response A_bar^l B_bar; a carried memory adds
        A_bar^(t+1) m_0."""
        u, m0 = self._begin(x, mask, state)
        a_bar, b_bar = self.system(u)
        n = x.shape[1]
        response = powers_applied(a_bar[None], b_bar[None], n)[0]  # (L, d): A_bar^l B_bar
        m = fft_conv(u.transpose(1, 2)[:, :, None], response.T)  # (b, channels, d, L)
        m = m.permute(0, 3, 1, 2)  # (b, L, channels, d)
        if m0 is not None:
            carried = powers_applied(a_bar[None], (m0 @ a_bar.T)[:, :, None], n)[:, :, 0]  # (b, c, L, d)
            m = m + carried.transpose(1, 2)
        return self._end(x, m, state, m[:, -1])
