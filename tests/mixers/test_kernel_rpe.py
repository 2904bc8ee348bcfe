"""Kernelized attention with RPE: FFT == explicit Toeplitz (outputs, gradients), b = 0 == Performer,
the estimate approaches softmax attention with the same bias as features grow, bad lengths refused."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ShapeError
from efformer.mixers.kernel_rpe import toeplitz_product
from tests.helpers import make_mixer, rel_err, with_form


def _random_rpe(m, scale=1.0, seed=0):
    with torch.no_grad():
        m.rpe.copy_(torch.randn(m.rpe.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return m


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_toeplitz_product_is_the_explicit_matrix_product(causal):
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2, 7, 13):
        span = 16 if causal else 2 * 16 - 1
        coef = torch.randn(3, span, generator=gen, dtype=torch.float64).exp()
        u = torch.randn(2, 3, t, 4, generator=gen, dtype=torch.float64)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        if causal:
            c = torch.where(j <= i, coef[:, (i - j).clamp_min(0)], 0.0)
        else:
            c = coef[:, j - i + 15]
        for n_q in (t, 1):
            got = toeplitz_product(u, coef, causal, n_q)
            assert torch.allclose(got, (c @ u)[:, :, t - n_q :], atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_fft_form_equals_explicit_toeplitz_form_with_a_learned_bias(causal):
    """In float64, so the only difference left is the FFT's rounding; every parameter's gradient compared."""
    m = _random_rpe(make_mixer("kernel_rpe", causal), scale=1.0).double()
    gen = torch.Generator().manual_seed(1)
    for n in (1, 7, 13, 32):
        x = torch.randn(2, n, m.d_model, generator=gen, dtype=torch.float64)
        keep = torch.rand(2, n, generator=gen) > 0.3
        keep[:, -1 if causal else 0] = True
        for mask in (None, keep):
            outs = []
            for form in ("reference", "fast"):
                with_form(m, form)
                xx = x.clone().requires_grad_(True)
                y, _ = m(xx, mask=mask)
                grads = torch.autograd.grad((y * y.detach().sin()).sum(), [xx, *m.parameters()])
                outs.append((y, *grads))
            for a, b in zip(*outs, strict=True):  # (a gradient that is zero in exact arithmetic is noise)
                assert rel_err(a, b) < 1e-10 or (a - b).abs().max() < 1e-12
    assert outs[0][-1].abs().sum() > 0  # the bias really gets a gradient


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_zero_bias_is_exactly_performer(causal):
    rpe = make_mixer("kernel_rpe", causal)
    perf = make_mixer("performer", causal, n_features=16)
    perf.load_state_dict({k: v for k, v in rpe.state_dict().items() if k != "rpe"})
    x = torch.randn(2, 11, 32)
    for form in ("reference", "fast"):
        assert rel_err(perf(x)[0], with_form(rpe, form)(x)[0]) < 1e-5


def _softmax_with_rpe(m, x):
    """Exact softmax(q k^T / sqrt(d) + b_{j-i}) v through the mixer's own projections."""
    h, d = m.n_heads, m.head_dim
    q = m.split_heads(m.q_proj(x))
    k, v = m.split_heads(m.kv_proj(x), 2 * h).chunk(2, dim=1)
    n = x.shape[1]
    bias = m.toeplitz(m.rpe.exp(), n, n).log()  # exp(b) then log: -inf above the diagonal when causal
    p = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias).softmax(-1)
    return m.out_proj(m.merge_heads(p @ v))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_estimate_approaches_softmax_with_the_same_bias_as_features_grow(causal):
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    errors = []
    for m_feat in (8, 64, 1024):
        torch.manual_seed(0)
        m = _random_rpe(make_mixer("kernel_rpe", causal, n_features=m_feat), scale=1.0, seed=4)
        m = with_form(m, "fast")
        errors.append(rel_err(_softmax_with_rpe(m, x), m(x)[0]))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


def test_a_strong_bias_turns_the_layer_local():
    """b = 0 at distance 0 and -inf elsewhere: every query attends only to itself (causal): z_i = v_i."""
    m = make_mixer("kernel_rpe", True)
    with torch.no_grad():
        m.rpe.fill_(-1e4)
        m.rpe[:, 0] = 0.0
    x = torch.randn(2, 9, 32)
    v = m.split_heads(m.kv_proj(x), 8).chunk(2, dim=1)[1]
    expected = m.out_proj(m.merge_heads(v))
    for form in ("reference", "fast"):
        assert torch.allclose(with_form(m, form)(x)[0], expected, atol=1e-5)


def test_longer_than_max_len_is_refused():
    m = make_mixer("kernel_rpe", True, max_len=8)
    with pytest.raises(ShapeError, match="max_len"):
        m(torch.randn(1, 9, 32))
    state = m.init_state(1, "cpu", torch.float32)
    m(torch.randn(1, 8, 32), state=state)
    with pytest.raises(ShapeError, match="max_len"):
        m(torch.randn(1, 1, 32), state=state)
