"""S4: the structured state space layer with a normal-plus-low-rank state matrix and a Cauchy kernel.

Paper: "Efficiently Modeling Long Sequences with Structured State Spaces" (Gu, Goel & Re, ICLR 2022).

Each of the d_model channels is a linear time-invariant SSM ``x' = A x + B u``, ``y = C x + D u`` of
state size N whose A starts as HiPPO-LegS. HiPPO-LegS is normal plus low rank: ``A = V (Lambda - p p*)
V*`` with Lambda diagonal (real part -1/2) and p = V* P, P_n = sqrt(n + 1/2). In the eigenbasis the
layer learns Lambda, p, B and C. The eigenvalues come in conjugate pairs, so only N/2 are stored and
the other half (their conjugates, with conjugate p, B, C) is implied: the system stays real.

Discretisation is bilinear: ``A_bar = (I - dt/2 A)^-1 (I + dt/2 A)``, ``B_bar = (I - dt/2 A)^-1 dt B``.
Unrolled, the layer is a causal convolution with ``K[l] = C A_bar^l B_bar``. S4 never forms those
powers. It evaluates the truncated generating function ``sum_(l<L) K[l] z^l = C~ (I - A_bar z)^-1 B_bar``
(with ``C~ = C (I - A_bar^L)``) at the L roots of unity, where the resolvent of a diagonal plus
rank-one matrix is a Cauchy sum corrected by the Woodbury identity. An inverse FFT then gives K.
As in the paper, C~ (for L = max_len) is the learned parameter, so the training form never forms a
dense matrix; the recurrence recovers ``C = C~ (I - A_bar^L)^-1``, and a call longer than max_len
forms C~ for its own length from C.

Forms: "fast" is the Cauchy kernel plus an FFT convolution; a decode state enters through the powers
of A_bar applied to it, in O(sqrt L) sequential steps. "reference" is the sequential bilinear
recurrence with dense A_bar; "recurrent" feeds the tokens one at a time through the decode state
(S4D's three forms, run with S4's kernel, dense-matrix step and carried-state powers).
Direction, padding, the D skip, GELU and the GLU output are those of S4D (:mod:`efformer.mixers.s4d`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Mixer, MixerOptions
from efformer.mixers.s4d import S4D
from efformer.registry import register_mixer


class S4Options(MixerOptions):
    """Options of S4."""

    d_state: int = Field(64, ge=2, multiple_of=2,
                         description="N: state size per channel (even); N // 2 conjugate-pair modes are stored")
    dt_min: float = Field(0.001, gt=0, description="initial log_dt is uniform in [log dt_min, log dt_max]")
    dt_max: float = Field(0.1, gt=0, description="upper end of the initial step sizes")


def hippo_legs(n: int) -> tuple[Tensor, Tensor]:
    """The HiPPO-LegS matrices in float64: A (n, n) and B (n,)."""
    q = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)
    a = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(torch.arange(1, n + 1, dtype=torch.float64))
    return a, q.clone()


def nplr_legs(n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HiPPO-LegS in its normal-plus-low-rank eigenbasis: Lambda, p, B (n // 2,) complex128 (one of each
    conjugate pair) and the eigenvectors V (n, n // 2), so that ``A = V_full (Lambda - p p*) V_full*``."""
    a, b = hippo_legs(n)
    p = torch.sqrt(torch.arange(n, dtype=torch.float64) + 0.5)
    skew = a + p[:, None] * p[None, :] + 0.5 * torch.eye(n, dtype=torch.float64)  # S + I/2: skew-symmetric
    mu, v = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # eigenvalues of skew are i mu, mu real
    keep = torch.argsort(mu, descending=True)[: n // 2]  # the positive halves of the +-mu pairs
    v = v[:, keep]
    lam = torch.complex(torch.full((n // 2,), -0.5, dtype=torch.float64), mu[keep])
    vh = v.conj().T
    return lam, vh @ p.to(v.dtype), vh @ b.to(v.dtype), v


def full(t: Tensor) -> Tensor:
    """The stored N/2 modes and their implied conjugates: (..., M) -> (..., 2M)."""
    return torch.cat([t, t.conj()], dim=-1)


def matvec(a: Tensor, v: Tensor) -> Tensor:
    """a (H, S, S) times v (..., H, S) -> (..., H, S)."""
    return torch.einsum("hij,...hj->...hi", a, v)


def powers_applied(a: Tensor, v: Tensor, n: int) -> Tensor:
    """``a^l v`` for l < n: a (H, S, S), v (..., H, S) -> (..., H, n, S).

    Powers are split as ``a^(cB + j) = a^(cB) a^j`` with B ~ sqrt(n): sqrt(n) sequential products
    instead of n, then one batched contraction.
    """
    block = max(1, math.isqrt(n))
    inner = [v]
    for _ in range(block - 1):
        inner.append(matvec(a, inner[-1]))
    step = torch.linalg.matrix_power(a, block)
    outer = [torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)]
    for _ in range(-(-n // block) - 1):
        outer.append(outer[-1] @ step)
    out = torch.einsum("chij,...hbj->...hcbi", torch.stack(outer), torch.stack(inner, -2))
    return out.flatten(-3, -2)[..., :n, :]


def cauchy_kernel(c_tilde: Tensor, lam: Tensor, p: Tensor, b: Tensor, dt: Tensor, n: int) -> Tensor:
    """K (directions, H, n) of the bilinear NPLR SSM from its truncated generating function at the roots of unity.

    c_tilde (directions, H, S), lam, p, b (H, S) complex over all S = 2M modes; dt (H,). With
    ``A = diag(lam) - p p*`` and z_k = exp(-2 pi i k / n), the generating function is
    ``2 c~ [(2/dt)(1 - z) - (1 + z) A]^-1 b``: the diagonal part gives Cauchy sums
    ``k_uv(z) = sum_s u_s v_s / ((2/dt)(1 - z) - (1 + z) lam_s)`` (the usual ``1 / (g(z) - lam)`` times
    ``1 / (1 + z)``, written so that z = -1, a root when n is even, stays finite) and the rank-one part the
    Woodbury correction ``k_cb - (1 + z) k_cp k_pb / (1 + (1 + z) k_pp)``.
    """
    k = torch.arange(n, device=lam.device, dtype=lam.real.dtype)
    z = torch.polar(torch.ones_like(k), -2 * math.pi * k / n)  # (n,)
    cauchy = 1 / ((2 / dt)[:, None, None] * (1 - z) - lam[..., None] * (1 + z))  # (H, S, n)
    dirs = c_tilde.shape[0]
    # every Cauchy sum at once: one batched (H, 2 dirs + 2, S) @ (H, S, n) product
    numer = torch.cat([(c_tilde * b).transpose(0, 1), (c_tilde * p).transpose(0, 1),
                       (p.conj() * b)[:, None], (p.conj() * p)[:, None]], dim=1)
    sums = (numer @ cauchy).transpose(0, 1)  # (2 dirs + 2, H, n)
    k_cb, k_cp, k_pb, k_pp = sums[:dirs], sums[dirs : 2 * dirs], sums[2 * dirs], sums[2 * dirs + 1]
    u = 1 + z
    generating = 2 * (k_cb - u * k_cp * k_pb / (1 + u * k_pp))
    return torch.fft.ifft(generating, n=n).real


@register_mixer("s4")
class S4(S4D):
    """S4: per-channel NPLR (HiPPO-LegS) SSM, bilinear, Cauchy-kernel FFT convolution, GELU and a GLU output."""

    capabilities = dataclasses.replace(
        S4D.capabilities,
        paper="Efficiently Modeling Long Sequences with Structured State Spaces",
        time="O(max_len d_model d_state + N d_model log N) training; decoding adds O(d_model d_state^3 log max_len) "
             "per call for the dense A_bar and C",
        memory="O(max_len d_model d_state) for the Cauchy matrix, O(d_model d_state) decode state",
    )
    Options = S4Options
    test_options = {"d_state": 8}

    def __init__(self, d_model: int, n_heads: int, **kw):
        Mixer.__init__(self, d_model, n_heads, **kw)  # S4D's own parameters are not S4's; its helpers are
        o = self.opts
        if o.dt_min > o.dt_max:
            raise ConfigError("s4.dt_min", o.dt_min, f"must not exceed dt_max={o.dt_max}")
        h, m = d_model, o.d_state // 2
        self.modes = o.d_state  # the decode state holds every mode, conjugates included (S4D.init_state)
        lam, p, b, _ = nplr_legs(o.d_state)
        self.log_dt = nn.Parameter(torch.rand(h) * (math.log(o.dt_max) - math.log(o.dt_min)) + math.log(o.dt_min))
        self.log_lam_real = nn.Parameter(torch.log(-lam.real).float().repeat(h, 1))
        self.lam_imag = nn.Parameter(lam.imag.float().repeat(h, 1))
        self.P = nn.Parameter(torch.view_as_real(p.to(torch.cfloat)).repeat(h, 1, 1))
        self.B = nn.Parameter(torch.view_as_real(b.to(torch.cfloat)).repeat(h, 1, 1))
        # S4 learns C~ = C (I - A_bar^L) for L = max_len directly (paper, section C.3), so that training
        # never forms A_bar; the recurrence recovers C from it.
        c = torch.randn(1 if self.causal else 2, h, m, dtype=torch.cfloat) * math.sqrt(0.5)
        self.C_tilde = nn.Parameter(torch.view_as_real(c))
        self.D = nn.Parameter(torch.randn(h))
        self.out_proj = nn.Linear(h, 2 * h)

    def _modes(self) -> tuple[Tensor, ...]:
        """dt (H,); lam, p, b (H, S) over all S modes; C~ (directions, H, S): all that the kernel needs."""
        dt = torch.exp(self.log_dt.float() if self.log_dt.dtype != torch.float64 else self.log_dt)
        real = dt.dtype
        lam = full(torch.complex(*(t.to(real) for t in (-torch.exp(self.log_lam_real), self.lam_imag))))
        p, b, c_tilde = (full(torch.view_as_complex(t.to(real).contiguous())) for t in (self.P, self.B, self.C_tilde))
        return dt, lam, p, b, c_tilde

    def system(self) -> tuple[Tensor, ...]:
        """dt, lam, p, b as in _modes; the output map C = C~ (I - A_bar^max_len)^-1 (directions, H, S); dense
        A_bar (H, S, S) and B_bar (H, S): what the recurrence needs.

        Without autograd (decoding) the result is kept until a parameter changes (in place, as optimisers
        do, or replaced), so token-by-token decoding pays the O(H S^3 log max_len) setup once.
        """
        if torch.is_grad_enabled():
            return self._dense_system()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if getattr(self, "_system_cache", (None,))[0] != key:
            self._system_cache = (key, self._dense_system())
        return self._system_cache[1]

    def _dense_system(self) -> tuple[Tensor, ...]:
        modes = self._modes()
        # The dense part runs in float64: I - A_bar^L is ill-conditioned when dt L is small, and float32
        # lost 1e-4 of the gradients through its solve.
        dt, lam, p, b, c_tilde = (t.to(torch.complex128 if t.is_complex() else torch.float64) for t in modes)
        a = torch.diag_embed(lam) - p[..., :, None] * p.conj()[..., None, :]
        eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
        half = (dt / 2)[:, None, None] * a
        a_bar = torch.linalg.solve(eye - half, eye + half)
        b_bar = torch.linalg.solve(eye - half, (dt[:, None] * b)[..., None])[..., 0]
        # C (I - A_bar^L) = C~ as row vectors, i.e. (I - A_bar^L)^T C^T = C~^T, per channel
        lhs = (eye - torch.linalg.matrix_power(a_bar, self.max_len)).transpose(-1, -2)
        c = torch.linalg.solve(lhs, c_tilde.permute(1, 2, 0)).permute(2, 0, 1)
        cplx = modes[1].dtype
        return (*modes[:4], c.to(cplx), a_bar.to(cplx), b_bar.to(cplx))

    def kernel(self, n: int) -> Tensor:
        """The convolution kernel K (directions, H, n) by the Cauchy/Woodbury generating function.

        Up to max_len it is the first n taps of the learned length-max_len kernel (no dense matrix is
        formed); past it, C~ for length n is formed from C and A_bar^n.
        """
        if n <= self.max_len:
            dt, lam, p, b, c_tilde = self._modes()
            return cauchy_kernel(c_tilde, lam, p, b, dt, self.max_len)[..., :n]
        dt, lam, p, b, c, a_bar, _ = self.system()
        c_tilde = c - torch.einsum("dhi,hij->dhj", c, torch.linalg.matrix_power(a_bar, n))
        return cauchy_kernel(c_tilde, lam, p, b, dt, n)

    # ---- the pieces S4D's three forms call (S4 inherits the forms themselves) -----------------
    def _discretise(self) -> tuple[None, Tensor, Tensor, Tensor]:
        """(unused, dense A_bar (H, S, S), B_bar (H, S), C (directions, H, S))."""
        *_, c, a_bar, b_bar = self.system()
        return None, a_bar, b_bar, c

    @staticmethod
    def _scan(u: Tensor, a_bar: Tensor, b_bar: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrence: u (b, L, H) real; h (b, H, S) complex -> y (b, L, H), h."""
        ys = []
        for t in range(u.shape[1]):
            h = matvec(a_bar, h) + b_bar * u[:, t, :, None]
            ys.append(torch.einsum("hs,bhs->bh", c, h).real)
        return torch.stack(ys, 1), h

    def _carry(self, ut: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """What the carried state h0 (b, H, S) adds to the outputs (b, H, L) of a call on ut (b, H, L), by
        powers of A_bar in O(sqrt L) sequential steps, and the state after the call."""
        *_, c, a_bar, b_bar = self.system()
        n = ut.shape[-1]
        carried = powers_applied(a_bar, matvec(a_bar, h0), n)  # (b, H, L, S): A_bar^(l+1) h0
        written = torch.einsum("bhl,hls->bhs", ut.flip(-1).to(a_bar.dtype), powers_applied(a_bar, b_bar, n))
        return torch.einsum("hs,bhls->bhl", c[0], carried).real, carried[:, :, -1] + written
