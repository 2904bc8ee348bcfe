"""ATLAS's long-term memory: a matrix memory over polynomial features, written by the Omega rule with Muon.

Paper: "ATLAS: Learning to Optimally Memorize the Context at Test Time" (Behrouz, Li, Kacham, Daliri,
Deng, Zhong, Razaviyayn and Mirrokni, 2025).

Per head, the memory M (V x F) maps polynomial features phi(k) (F of them) to values. Where the delta
rule fits M to the last token only, the Omega rule fits it to a sliding window of the last c tokens,

    loss_t(M) = sum_{i=t-c+1..t} gamma_i * 1/2 ||M phi(k_i) - v_i||^2,

and ATLAS descends that loss with momentum, orthogonalised as in Muon:

    S_t = theta_t S_{t-1} + grad loss_t(M_0),    M_t = alpha_t M_{t-1} - eta_t NS(S_t),    y_t = M_t phi(q_t),

with NS a few Newton-Schulz steps (Muon's quintic) towards the polar factor of S_t. The gates alpha
(forget), eta (step size), theta (momentum) and gamma (how much token i counts in every window it is
in) are sigmoids of per-head projections of x.

As in the paper's parallel training, the gradients of a chunk of ``chunk_size`` tokens (aligned to
absolute positions) are all taken at M_0, the memory at the start of that chunk: the chunk's
gradients are then independent of each other and computed at once, and the momentum and memory
recurrences, being linear, are solved within the chunk by decayed sums. ``chunk_size = 1`` is the
fully online rule (M_0 = M_{t-1}). The chunking therefore belongs to the definition of the layer,
not only to its speed: "reference" walks the tokens one at a time under the same rule, and
"chunked" is the parallel form; they agree to rounding.

The feature map is the paper's polynomial map phi_p(x) = [a_0, a_1 x, a_2 x (x) x, ...] of the unit-norm
key (all monomials, as tensor powers), with learned per-head coefficients a_i initialised to
1/sqrt(i!), so phi(q) . phi(k) = sum_i (q . k)^i / i! starts as the degree-p Taylor expansion of exp(q . k).

What we chose where the paper leaves room or where we left parts out:
- the memory is a matrix (the paper's "deep" MLP memory is not implemented); with it, Muon acts on the
  one V x F matrix per head;
- gamma_i depends on token i only (one weight per token for every window it enters), alpha, eta and
  theta on the current token; their bias initialisations are ours;
- the loss carries a factor 1/2 (its gradient is (M phi - v) phi^T), Newton-Schulz normalises by the
  Frobenius norm and runs ``ns_steps`` (5) quintic steps with Muon's coefficients;
- no short convolution on q, k, v; the output is RMS-normed per head before the output projection.

Padding: a padded token counts in no window (gamma = 0) and its step changes nothing (alpha = theta = 1,
eta = 0, no gradient), so padded content never reaches a real output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Mixer, MixerOptions, MixerState, causal_recurrent
from efformer.registry import register_mixer

MUON_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz coefficients
MAX_FEATURES = 4096  # features per head beyond which a V x F memory per token in a chunk is unreasonable


def newton_schulz(x: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Muon's quintic Newton-Schulz iteration on the last two dims of ``x`` (..., V, F): about the polar factor.

    Each step is y <- (a I + b G + c G^2) y with G = y y^T, so y_k = Q_k y_0 for a V x V matrix Q_k, and
    G_k = Q_k G_0 Q_k^T: the steps run on V x V matrices and touch the long side F only twice. They run in
    float64 (cheap at V x V), because iterating on G squares the condition number that iterating on y sees.
    """
    a, b, c = MUON_COEFFS
    wide = x.shape[-2] <= x.shape[-1]
    y = x if wide else x.transpose(-1, -2)
    y64 = y.double()
    y64 = y64 / (y64.norm(dim=(-2, -1), keepdim=True) + eps)
    g0 = y64 @ y64.transpose(-1, -2)
    q = torch.eye(y.shape[-2], dtype=g0.dtype, device=y.device).expand_as(g0)
    for _ in range(steps):
        g = q @ g0 @ q.transpose(-1, -2)
        q = (b * g + c * g @ g) @ q + a * q
    y = (q @ y64).to(x.dtype)
    return y if wide else y.transpose(-1, -2)


def polynomial_features(x: Tensor, coef: Tensor) -> Tensor:
    """phi(x) = [a_0, a_1 x, a_2 vec(x (x) x), ...] for x (b, h, n, d) and coef (h, p+1): (b, h, n, F)."""
    parts, power = [coef[:, 0, None, None].expand(*x.shape[:-1], 1)], None
    for i in range(1, coef.shape[1]):
        power = x if power is None else (power[..., :, None] * x[..., None, :]).flatten(-2)
        parts.append(coef[:, i, None, None] * power)
    return torch.cat(parts, dim=-1)


def feature_dim(d: int, degree: int) -> int:
    """Features of the degree-``degree`` map of a d-dim key: 1 + d + d^2 + ... + d^degree."""
    return sum(d**i for i in range(degree + 1))


# ---- the memory rule on (batch, heads, seq, *) tensors -------------------------------------------------
# phi_q (b, h, n, F); phi_k (b, h, c-1+n, F) and v (b, h, c-1+n, V) with the c-1 earlier tokens first;
# w (b, h, c-1+n) = gamma * keep of those tokens; keep, log_alpha, eta, log_theta (b, h, n) with a padded
# step already made neutral (keep 0, log gates 0, eta 0). Memory M, momentum S, chunk-start memory M0
# (b, h, V, F); pos0 = the absolute position of the first new token. Each returns y (b, h, n, V), M, S, M0.


def omega_gradient(m0: Tensor, phi_k: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """grad of sum_i w_i 1/2 ||M0 phi_i - v_i||^2 over the tokens given: (b, h, V, F)."""
    err = torch.einsum("bhvf,bhif->bhiv", m0, phi_k) - v
    return torch.einsum("bhi,bhiv,bhif->bhvf", w, err, phi_k)


def atlas_reference(phi_q, phi_k, v, w, keep, log_alpha, eta, log_theta, M, S, M0, pos0, *, chunk, window,
                    muon, ns_steps):
    """The rule as written, one token at a time: snapshot M0 at chunk starts, window gradient, momentum, update."""
    ys = []
    for t in range(phi_q.shape[2]):
        if (pos0 + t) % chunk == 0:
            M0 = M
        rows = slice(t, t + window)  # token t and the window - 1 tokens before it
        g = omega_gradient(M0, phi_k[:, :, rows], v[:, :, rows], w[:, :, rows]) * keep[:, :, t, None, None]
        S = log_theta[:, :, t, None, None].exp() * S + g
        u = newton_schulz(S, ns_steps) if muon else S
        M = log_alpha[:, :, t, None, None].exp() * M - eta[:, :, t, None, None] * u
        ys.append(torch.einsum("bhvf,bhf->bhv", M, phi_q[:, :, t]))
    return torch.stack(ys, dim=2), M, S, M0


def _decay_matrix(log_gate: Tensor) -> Tensor:
    """exp(sum_{j<r<=t} log_gate_r) for j <= t, else 0: (b, h, T, T) from log gates (b, h, T)."""
    cum = log_gate.cumsum(-1)
    t = log_gate.shape[-1]
    lower = torch.ones(t, t, dtype=torch.bool, device=log_gate.device).tril()
    return (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()


def atlas_chunked(phi_q, phi_k, v, w, keep, log_alpha, eta, log_theta, M, S, M0, pos0, *, chunk, window,
                  muon, ns_steps):
    """Chunk-parallel form: per chunk, every token's window gradient at M0 at once (a banded sum), the
    momentum and memory recurrences as decayed sums, Newton-Schulz batched over the chunk's tokens."""
    n = phi_q.shape[2]
    ys, s = [], 0
    while s < n:
        e = min(n, s + chunk - (pos0 + s) % chunk)  # up to the next absolute chunk boundary
        t_len = e - s
        if (pos0 + s) % chunk == 0:
            M0 = M
        rows = slice(s, e + window - 1)
        err = torch.einsum("bhvf,bhif->bhiv", M0, phi_k[:, :, rows]) - v[:, :, rows]  # (b, h, L, V)
        i = torch.arange(t_len + window - 1, device=v.device)
        band = (i[None, :] >= torch.arange(t_len, device=v.device)[:, None]) & (
            i[None, :] < torch.arange(t_len, device=v.device)[:, None] + window)  # token t sees rows t..t+c-1
        wb = band.to(w.dtype) * w[:, :, None, rows] * keep[:, :, s:e, None]  # (b, h, T, L)
        g = torch.einsum("bhti,bhiv,bhif->bhtvf", wb, err, phi_k[:, :, rows])
        lt = log_theta[:, :, s:e]
        s_all = lt.cumsum(-1).exp()[..., None, None] * S[:, :, None] + torch.einsum(
            "bhtj,bhjvf->bhtvf", _decay_matrix(lt), g)
        u = newton_schulz(s_all, ns_steps) if muon else s_all
        la = log_alpha[:, :, s:e]
        m_all = la.cumsum(-1).exp()[..., None, None] * M[:, :, None] - torch.einsum(
            "bhtj,bhjvf->bhtvf", _decay_matrix(la) * eta[:, :, None, s:e], u)
        ys.append(torch.einsum("bhtvf,bhtf->bhtv", m_all, phi_q[:, :, s:e]))
        S, M, s = s_all[:, :, -1], m_all[:, :, -1], e
    return torch.cat(ys, dim=2), M, S, M0


_FORMS = {"reference": atlas_reference, "chunked": atlas_chunked}


# ---- the layer ---------------------------------------------------------------------------------------------


@dataclass
class AtlasState(MixerState):
    """Decode state: memory M, momentum S and chunk-start memory M0 (batch, heads, V, F), and the last
    window - 1 tokens' features (batch, heads, window-1, F), values (..., V) and weights (..., window-1)."""

    M: Tensor
    S: Tensor
    M0: Tensor
    phi_k: Tensor
    v: Tensor
    w: Tensor


class AtlasOptions(MixerOptions):
    """Options of the ATLAS memory."""

    window: int = Field(8, ge=1, le=1024, description="Omega-rule window c: the memory is fit to the last c tokens")
    degree: int = Field(2, ge=1, le=3, description="degree p of the polynomial feature map of keys and queries")
    chunk_size: int = Field(16, ge=1, le=1024, description="tokens whose gradients are taken at the same "
                            "chunk-start memory (part of the rule, as in the paper's parallel training); 1 = online")
    muon: bool = Field(True, description="orthogonalise the momentum by Newton-Schulz (Muon); False = plain momentum")
    ns_steps: int = Field(5, ge=1, le=20, description="Newton-Schulz steps of the Muon update")


@register_mixer("atlas")
class Atlas(Mixer):
    """ATLAS's long-term memory (matrix memory, polynomial features, Omega rule, Muon momentum); causal only."""

    capabilities = causal_recurrent(
        paper="ATLAS: Learning to Optimally Memorize the Context at Test Time",
        time="O(N (C + c) V F + N k V^3) chunked (F features, C chunk, c window, k Newton-Schulz steps)",
        memory="O(N V F) per head for training (each token's momentum and memory), O((V + c) F) decode state",
        forms=("reference", "chunked"),
    )
    Options = AtlasOptions
    test_options = {"window": 3, "chunk_size": 4, "degree": 2}
    # Newton-Schulz multiplies a perturbation along a small singular direction of S by about
    # f'(0)^k = 3.4445^5 ~ 500, and S has rank <= tokens seen, so float32 rounding that differs between
    # the forms' summation orders reaches gradients at ~1e-4 relative (measured 6e-5 at n=1). In float64 the
    # forms agree to 1e-12 (tests/mixers/test_atlas.py), so the contract compares float32 forms at 1e-4.
    form_tolerance: ClassVar[float] = 1e-4

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        self.n_features = feature_dim(self.head_dim, o.degree)
        if self.n_features > MAX_FEATURES:
            raise ConfigError(f"{self.name}.degree", o.degree,
                              f"gives {self.n_features} features per head at head_dim={self.head_dim} (at most "
                              f"{MAX_FEATURES}); lower the degree or use more, narrower heads")
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.gate_proj = nn.Linear(d_model, 4 * n_heads)  # alpha, eta, theta, gamma per head
        with torch.no_grad():  # retain memory, small steps, some momentum, count every window token
            self.gate_proj.bias.copy_(torch.tensor([4.0, -2.0, 1.0, 2.0]).repeat_interleave(n_heads))
        self.coef = nn.Parameter(torch.tensor([1 / math.sqrt(math.factorial(i)) for i in range(o.degree + 1)])
                                 .repeat(n_heads, 1))
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused q|k|v projection, and the output projection."""
        return {"value": [self.qkv_proj.weight[2 * self.d_model :]], "output": [self.out_proj.weight]}

    def init_state(self, batch, device, dtype) -> AtlasState:
        """Zero memory and momentum (in at least fp32) and an empty (zero-weight) window."""
        dt = torch.promote_types(dtype, torch.float32)
        h, dv, f, c = self.n_heads, self.head_dim, self.n_features, self.opts.window - 1
        zeros = [torch.zeros(batch, h, dv, f, device=device, dtype=dt) for _ in range(3)]
        return AtlasState(*zeros, phi_k=torch.zeros(batch, h, c, f, device=device, dtype=dt),
                          v=torch.zeros(batch, h, c, dv, device=device, dtype=dt),
                          w=torch.zeros(batch, h, c, device=device, dtype=dt))

    def _run(self, form: str, x: Tensor, mask: Tensor | None, state: AtlasState | None):
        ct = torch.promote_types(x.dtype, torch.float32)  # the memory accumulates: at least fp32
        b, n, _ = x.shape
        q, k, v = (self.split_heads(t).to(ct) for t in self.qkv_proj(x).chunk(3, dim=-1))
        coef = self.coef.to(ct)
        phi_q = polynomial_features(F.normalize(q, dim=-1), coef)
        phi_k = polynomial_features(F.normalize(k, dim=-1), coef)
        gates = self.gate_proj(x).to(ct).unflatten(-1, (4, self.n_heads)).permute(2, 0, 3, 1)  # (4, b, h, n)
        log_alpha, eta, log_theta, gamma = F.logsigmoid(gates[0]), gates[1].sigmoid(), F.logsigmoid(gates[2]), \
            gates[3].sigmoid()
        keep = torch.ones_like(eta) if mask is None else mask[:, None, :].to(ct).expand_as(eta)
        log_alpha, eta, log_theta, w = log_alpha * keep, eta * keep, log_theta * keep, gamma * keep
        if state is None:
            state = self.init_state(b, x.device, ct)
            carried, pos0 = None, 0
        else:
            carried, pos0 = state, state.seen
        phi_k = torch.cat([state.phi_k.to(ct), phi_k], dim=2)
        v = torch.cat([state.v.to(ct), v], dim=2)
        w = torch.cat([state.w.to(ct), w], dim=2)
        y, M, S, M0 = _FORMS[form](phi_q, phi_k, v, w, keep, log_alpha, eta, log_theta, state.M.to(ct),
                                   state.S.to(ct), state.M0.to(ct), pos0, chunk=self.opts.chunk_size,
                                   window=self.opts.window, muon=self.opts.muon, ns_steps=self.opts.ns_steps)
        if carried is not None:
            c = self.opts.window - 1
            carried.M, carried.S, carried.M0 = (t.to(carried.M.dtype) for t in (M, S, M0))
            carried.phi_k, carried.v, carried.w = (t[:, :, t.shape[2] - c :].to(carried.M.dtype) for t in (phi_k, v, w))
        y = self.merge_heads(self.out_norm(y.to(x.dtype)))
        return self.out_proj(y), carried

    def forward_reference(self, x, *, mask, state, pos):
        """Token by token: the Omega-rule gradient at the chunk-start memory, momentum, Muon, update, read."""
        return self._run("reference", x, mask, state)

    def forward_chunked(self, x, *, mask, state, pos):
        """Chunk-parallel training / prefill form (banded window gradients, decayed sums, batched Newton-Schulz)."""
        return self._run("chunked", x, mask, state)
