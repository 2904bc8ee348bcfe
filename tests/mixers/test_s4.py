"""S4: HiPPO-LegS in NPLR form, bilinear, Cauchy kernel == powers of A_bar == recurrence, forms, decode."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.s4 import full, hippo_legs, nplr_legs
from efformer.mixers.s4d import fft_conv
from tests.helpers import assert_forms_agree, make_mixer, rel_err, with_form

FORMS = ("reference", "fast", "recurrent")


def _legs_basis(n: int):
    """The full eigenbasis V (n, n) and the full Lambda, p, B of HiPPO-LegS."""
    lam, p, b, v = nplr_legs(n)
    return full(v), full(lam), torch.cat([p, p.conj()]), torch.cat([b, b.conj()])


@pytest.mark.parametrize("n", [2, 8, 16, 64])
def test_nplr_form_reconstructs_hippo_legs(n):
    a, b = hippo_legs(n)
    v, lam, p, bb = _legs_basis(n)
    assert torch.allclose(v.conj().T @ v, torch.eye(n, dtype=v.dtype), atol=1e-10)  # unitary
    assert (lam.real == -0.5).all()
    recon = v @ (torch.diag(lam) - p[:, None] * p.conj()[None]) @ v.conj().T
    assert (recon - a).abs().max() < 1e-9 * n
    assert (v @ bb - b).abs().max() < 1e-9 * n
    assert a[1, 0] == -(3 ** 0.5) and a[1, 1] == -2 and a[0, 1] == 0  # the LegS entries themselves


def test_bilinear_discretisation_of_the_learned_system_is_that_of_hippo_legs():
    m = make_mixer("s4", True, d_state=8).double()
    dt, *_, a_bar, b_bar = m.system()
    a, b = hippo_legs(8)
    v, *_ = _legs_basis(8)
    eye = torch.eye(8, dtype=torch.float64)
    for ch in (0, 5):
        h = dt[ch] / 2
        want_a = torch.linalg.solve(eye - h * a, eye + h * a)
        want_b = torch.linalg.solve(eye - h * a, dt[ch] * b)
        assert (v @ a_bar[ch] @ v.conj().T - want_a).abs().max() < 1e-6  # the parameters are stored in float32
        assert (v @ b_bar[ch] - want_b).abs().max() < 1e-6  # the parameters are stored in float32


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
def test_cauchy_kernel_equals_powers_of_a_bar_and_the_recurrence(causal, n):
    """K from the generating function at the roots of unity (Cauchy sums, Woodbury) == C A_bar^l B_bar
    formed by matrix powers == the impulse response of the unrolled recurrence; odd and even n (z = -1),
    shorter than max_len (taps of the learned C~'s kernel) and longer (C~ formed for n from C)."""
    m = make_mixer("s4", causal, d_state=8, max_len=16).double()  # n = 33 forms C~ for its own length
    with torch.no_grad():
        m.C_tilde.normal_()  # both directions' output maps distinct and generic
        m.P.mul_(1.5)  # a low-rank term away from init, so the Woodbury correction carries weight
    k = m.kernel(n)
    *_, c, a_bar, b_bar = m.system()
    power, powers = b_bar, []
    for _ in range(n):
        powers.append(torch.einsum("dhs,hs->dh", c, power).real)
        power = torch.einsum("hij,hj->hi", a_bar, power)
    materialised = torch.stack(powers, -1)
    assert rel_err(materialised, k) < 1e-10
    impulse = torch.zeros(1, n, m.d_model, dtype=torch.float64)
    impulse[:, 0] = 1
    response, _ = m._scan(impulse, a_bar, b_bar, c[0], torch.zeros(1, m.d_model, m.modes, dtype=a_bar.dtype))
    assert rel_err(response[0].T, k[0]) < 1e-10
    u = torch.randn(2, m.d_model, n, dtype=torch.float64)
    direct = torch.stack([(k[0, :, : t + 1].flip(-1) * u[..., : t + 1]).sum(-1) for t in range(n)], -1)
    assert rel_err(direct, fft_conv(u, k[0])) < 1e-10


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_forms_agree_on_outputs_states_and_gradients(causal):
    m = make_mixer("s4", causal)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 13, 40):
        x = torch.randn(2, n, m.d_model, generator=gen)
        h0 = torch.randn(2, m.d_model, m.modes, 2, generator=gen) * 0.3 if causal else None
        assert_forms_agree(m, FORMS, x, init=None if h0 is None else {"h": h0})


def test_prefill_state_continues_exactly():
    """Prefill by the fast form then decode token by token == one reference pass over everything."""
    m = make_mixer("s4", True)
    x = torch.randn(1, 30, m.d_model)
    y_full, _ = with_form(m, "reference")(x)
    state = m.init_state(1, "cpu", torch.float32)
    y1, state = with_form(m, "fast")(x[:, :23], state=state)
    ys = [y1]
    for t in range(23, 30):
        y, state = with_form(m, "recurrent")(x[:, t : t + 1], state=state)
        ys.append(y)
    assert rel_err(y_full, torch.cat(ys, 1)) < 1e-5


def test_long_sequence_is_stable():
    m = make_mixer("s4", True, d_state=16)
    x = torch.randn(1, 1024, m.d_model) * 3
    with torch.no_grad():
        y_fast, _ = with_form(m, "fast")(x)
        y_ref, _ = with_form(m, "reference")(x)
    assert torch.isfinite(y_fast).all()
    assert rel_err(y_ref, y_fast) <= 1e-4


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="s4.d_state"):
        make_mixer("s4", True, d_state=7)
    with pytest.raises(ConfigError, match="s4.d_state"):
        make_mixer("s4", True, d_state=0)
    with pytest.raises(ConfigError, match="s4.dt_min"):
        make_mixer("s4", True, dt_min=1.0, dt_max=0.1)
    with pytest.raises(CapabilityError, match="s4: a bidirectional"):
        make_mixer("s4", False).init_state(1, "cpu", torch.float32)


def test_cached_decode_system_follows_parameter_updates():
    """Decoding without autograd keeps the dense A_bar and C between calls; an in-place update (an
    optimiser step) must refresh them."""
    m = make_mixer("s4", True)
    x = torch.randn(1, 6, m.d_model)
    with torch.no_grad():
        for _ in range(2):
            with torch.enable_grad():
                want, _ = with_form(m, "reference")(x)  # autograd on: never cached
            state = m.init_state(1, "cpu", torch.float32)
            got = torch.cat([with_form(m, "recurrent")(x[:, t : t + 1], state=state)[0] for t in range(6)], 1)
            assert rel_err(want, got) < 1e-5
            m.log_dt.add_(0.5)
            m.C_tilde.mul_(-1.0)
