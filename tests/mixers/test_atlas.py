"""ATLAS memory: both forms == an oracle written from the paper (autograd Omega loss, SVD Newton-Schulz),
the delta-rule limit, the polynomial kernel, float64 form agreement with state and masks, bad options."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.atlas import (
    MUON_COEFFS,
    atlas_chunked,
    atlas_reference,
    feature_dim,
    newton_schulz,
    polynomial_features,
)
from efformer.mixers.deltanet import delta_rule_reference
from efformer.registry import MIXERS
from tests.helpers import make_mixer, rel_err, with_form

D64 = torch.float64


def _spectral_newton_schulz(x, steps, eps=1e-7):
    """Newton-Schulz through the SVD: the scalar quintic applied to the singular values of x / (||x||_F + eps)."""
    u, s, vh = torch.linalg.svd(x / (x.norm(dim=(-2, -1), keepdim=True) + eps), full_matrices=False)
    a, b, c = MUON_COEFFS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag_embed(s) @ vh


def _oracle(phi_q, phi_k, v, gamma, log_alpha, eta, log_theta, *, chunk, window, muon, steps):
    """The rule from the paper, token by token, with the Omega loss differentiated by autograd (no carried state)."""
    b, h, n, f = phi_q.shape
    M = torch.zeros(b, h, v.shape[-1], f, dtype=D64)
    S = torch.zeros_like(M)
    ys = []
    for t in range(n):
        if t % chunk == 0:
            M0 = M.detach().clone()
        m0 = M0.clone().requires_grad_(True)
        lo = max(0, t - window + 1)
        pred = torch.einsum("bhvf,bhif->bhiv", m0, phi_k[:, :, lo : t + 1])
        loss = (gamma[:, :, lo : t + 1, None] * 0.5 * (pred - v[:, :, lo : t + 1]) ** 2).sum()
        (g,) = torch.autograd.grad(loss, m0)
        S = log_theta[:, :, t, None, None].exp() * S + g
        u = _spectral_newton_schulz(S, steps) if muon else S
        M = log_alpha[:, :, t, None, None].exp() * M - eta[:, :, t, None, None] * u
        ys.append(torch.einsum("bhvf,bhf->bhv", M, phi_q[:, :, t]))
    return torch.stack(ys, 2)


def _inputs(n, window, f=6, dv=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h = 2, 2
    r = lambda *s: torch.randn(*s, generator=gen, dtype=D64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=D64)  # noqa: E731
    return dict(phi_q=r(b, h, n, f), phi_k=r(b, h, n, f), v=r(b, h, n, dv), gamma=u(b, h, n),
                log_alpha=-0.2 * u(b, h, n), eta=0.5 * u(b, h, n), log_theta=-u(b, h, n))


def _run_form(fn, t, *, chunk, window, muon, steps):
    b, h, n, f = t["phi_q"].shape
    dv = t["v"].shape[-1]
    pad = window - 1  # the empty window before the first token
    phi_k = torch.cat([torch.zeros(b, h, pad, f, dtype=D64), t["phi_k"]], 2)
    v = torch.cat([torch.zeros(b, h, pad, dv, dtype=D64), t["v"]], 2)
    w = torch.cat([torch.zeros(b, h, pad, dtype=D64), t["gamma"]], 2)
    z = torch.zeros(b, h, dv, f, dtype=D64)
    y, *_ = fn(t["phi_q"], phi_k, v, w, torch.ones_like(t["eta"]), t["log_alpha"], t["eta"], t["log_theta"],
               z, z, z, 0, chunk=chunk, window=window, muon=muon, ns_steps=steps)
    return y


def test_newton_schulz_is_the_quintic_on_singular_values():
    x = torch.randn(3, 4, 7, dtype=D64)
    for steps in (1, 5):
        assert rel_err(_spectral_newton_schulz(x, steps, 0.0), newton_schulz(x, steps, eps=0.0)) < 1e-10
        tall = x.transpose(-1, -2)  # the tall case runs on the transpose
        assert rel_err(_spectral_newton_schulz(tall, steps, 0.0), newton_schulz(tall, steps, eps=0.0)) < 1e-10
    s = torch.linalg.svdvals(newton_schulz(torch.randn(8, 40, dtype=D64), 5))
    assert s.min() > 0.6 and s.max() < 1.25  # Muon's band around the polar factor


@pytest.mark.parametrize(("chunk", "window", "muon"), [(1, 1, True), (4, 3, True), (3, 5, False), (16, 2, True)])
def test_both_forms_equal_the_paper_oracle(chunk, window, muon):
    t = _inputs(11, window)
    want = _oracle(**t, chunk=chunk, window=window, muon=muon, steps=5)
    for fn in (atlas_reference, atlas_chunked):
        got = _run_form(fn, t, chunk=chunk, window=window, muon=muon, steps=5)
        assert rel_err(want, got) < 1e-10, fn.__name__


def test_chunk_start_memory_matters():
    """Chunking is part of the rule: gradients at the chunk-start memory differ from the online rule."""
    t = _inputs(9, 3)
    online = _run_form(atlas_reference, t, chunk=1, window=3, muon=True, steps=5)
    chunked = _run_form(atlas_reference, t, chunk=4, window=3, muon=True, steps=5)
    assert torch.allclose(online[:, :, :1], chunked[:, :, :1])  # the first token is its chunk's start either way
    assert rel_err(online, chunked) > 1e-3


def test_window_one_without_momentum_or_muon_is_the_delta_rule():
    """c = 1, theta = 0, alpha = 1, no Muon, M_t = M - eta gamma (M phi - v) phi^T, DeltaNet at beta = eta gamma."""
    t = _inputs(10, 1)
    t["log_alpha"] = torch.zeros_like(t["log_alpha"])
    t["log_theta"] = torch.full_like(t["log_theta"], -1000.0)  # theta = e^-1000 = 0 in float64
    got = _run_form(atlas_chunked, t, chunk=1, window=1, muon=False, steps=5)
    want, _ = delta_rule_reference(t["phi_q"], t["phi_k"], t["v"], t["eta"] * t["gamma"])
    assert rel_err(want, got) < 1e-12


def test_polynomial_features_give_the_taylor_kernel_of_exp():
    coef = torch.tensor([1 / math.sqrt(math.factorial(i)) for i in range(4)], dtype=D64).repeat(4, 1)
    assert torch.allclose(make_mixer("atlas", True, degree=3).coef.detach().to(D64), coef)  # the initial a_i
    q, k = torch.nn.functional.normalize(torch.randn(2, 4, 5, 8, dtype=D64), dim=-1).unbind(0)
    fq, fk = polynomial_features(q[None], coef), polynomial_features(k[None], coef)
    assert fq.shape[-1] == feature_dim(8, 3) == 1 + 8 + 64 + 512
    dot = (q * k).sum(-1)
    taylor = sum(dot**i / math.factorial(i) for i in range(4))
    assert rel_err(taylor[None], (fq * fk).sum(-1)) < 1e-12


@pytest.mark.parametrize("opts", [{"window": 6, "chunk_size": 4}, {"window": 2, "chunk_size": 5, "muon": False}])
def test_mixer_forms_agree_in_float64_with_masks_and_a_carried_state(opts):
    m = make_mixer("atlas", True, **opts).to(D64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 13, 32, dtype=D64, generator=gen)
    mask = torch.rand(2, 13, generator=gen) > 0.3
    mask[:, -1] = True
    outs = []
    for form in ("reference", "chunked"):
        with_form(m, form)
        xg = x.clone().requires_grad_(True)
        y, _ = m(xg, mask=mask)
        state = m.init_state(2, "cpu", D64)
        y1, state = m(xg[:, :6], mask=mask[:, :6], state=state)
        y2, state = m(xg[:, 6:], mask=mask[:, 6:], state=state)
        assert rel_err(y, torch.cat([y1, y2], 1)) < 1e-10
        (y.square().sum() + y2.sum()).backward()
        outs.append((y.detach(), xg.grad, *(p.grad.clone() for p in m.parameters())))
        m.zero_grad(set_to_none=True)
    for a, b in zip(*outs, strict=True):
        assert rel_err(a, b) < 1e-10


def test_bad_options_are_refused_with_the_field():
    cls = MIXERS.get("atlas")
    with pytest.raises(ConfigError, match="atlas.degree"):
        cls(512, 4, causal=True, options={"degree": 3})  # 128-dim heads: 2.1M features
    for bad in ({"window": 0}, {"chunk_size": 0}, {"degree": 0}, {"ns_steps": 0}):
        with pytest.raises(ConfigError, match=f"atlas.{next(iter(bad))}"):
            cls(32, 4, causal=True, options=bad)
