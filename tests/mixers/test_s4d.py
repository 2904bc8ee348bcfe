"""S4D: FFT kernel == recurrence, forms agree with states and gradients, padding, decode, stability."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.s4d import fft_conv, recurrence, ssm_kernel
from tests.helpers import make_mixer, rel_err, with_form

FORMS = ("reference", "fast", "recurrent")
LENGTHS = (1, 7, 13, 67)


def _run(m, form, x, mask, init):
    """Outputs (and final state) of one form, and gradients w.r.t. x, the initial state and the weights."""
    with_form(m, form)
    x = x.clone().requires_grad_(True)
    state, leaves = None, []
    if init is not None:
        leaves.append(init.clone().requires_grad_(True))
        state = m.init_state(x.shape[0], "cpu", x.dtype)
        state.h = leaves[0]
    y, state = m(x, mask=mask, state=state)
    outs = [y] if state is None else [y, state.h]
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    params = list(m.parameters())
    grads = torch.autograd.grad(loss, [x, *leaves, *params])
    return [o.detach() for o in outs], grads


def _keep(b: int, n: int, causal: bool, gen: torch.Generator) -> torch.Tensor:
    """Left (causal) or right (bidirectional) padding plus random holes."""
    keep = torch.rand(b, n, generator=gen) > 0.2
    for i in range(b):
        pad = int(torch.randint(0, n // 2 + 1, (1,), generator=gen))
        if causal:
            keep[i, :pad] = False
        else:
            keep[i, n - pad :] = False
    return keep


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("init", ["lin", "inv"])
def test_forms_agree_on_outputs_states_and_gradients(causal, init):
    m = make_mixer("s4d", causal, init=init)
    gen = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        x = torch.randn(2, n, m.d_model, generator=gen)
        h0 = torch.randn(2, m.d_model, m.modes, 2, generator=gen) if causal else None
        for mask in (None, _keep(2, n, causal, gen) if n > 1 else None):
            ref_out, ref_grad = _run(m, "reference", x, mask, h0)
            for form in FORMS[1:]:
                out, grad = _run(m, form, x, mask, h0)
                for i, (a, b) in enumerate(zip(ref_out, out, strict=True)):
                    assert rel_err(a, b) <= 1e-5, f"{form} output/state #{i} differs at n={n}"
                for i, (a, b) in enumerate(zip(ref_grad, grad, strict=True)):
                    assert rel_err(a, b) <= 1e-5, f"{form} gradient #{i} differs at n={n}"


def test_vandermonde_kernel_is_the_impulse_response_of_the_recurrence():
    m = make_mixer("s4d", True)
    n = 40
    dt_a, a_bar, b_bar, c = m._discretise()
    vander = torch.exp(dt_a[..., None] * torch.arange(n))
    kernel = 2 * torch.einsum("hm,hml->hl", c[0] * b_bar, vander).real  # (H, L)
    impulse = torch.zeros(1, n, m.d_model)
    impulse[:, 0] = 1
    response, _ = recurrence(impulse, a_bar, b_bar, c[0], torch.zeros(1, m.d_model, m.modes, dtype=a_bar.dtype))
    assert rel_err(response[0].T, kernel) <= 1e-5
    u = torch.randn(2, m.d_model, n)
    direct = torch.stack([(kernel[:, : t + 1].flip(-1) * u[..., : t + 1]).sum(-1) for t in range(n)], -1)
    assert rel_err(direct, fft_conv(u, kernel)) <= 1e-5


@pytest.mark.parametrize("n", [1, 2, 7, 40, 97, 1000])
def test_blocked_kernel_equals_the_plain_vandermonde_product(n):
    """ssm_kernel splits A^l as A^(cB) A^j; it must equal the (H, M, L) Vandermonde sum, both directions."""
    m = make_mixer("s4d", False)
    dt_a, _, b_bar, c = (t.double() if not t.is_complex() else t.to(torch.complex128) for t in m._discretise())
    w = c * b_bar
    want = 2 * torch.einsum("dhm,hml->dhl", w, torch.exp(dt_a[..., None] * torch.arange(n))).real
    assert rel_err(want, ssm_kernel(w, dt_a, n)) <= 1e-10


def test_initialisations_follow_the_paper():
    lin, inv = make_mixer("s4d", True, d_state=8), make_mixer("s4d", True, d_state=8, init="inv")
    n = torch.arange(4.0)
    assert torch.allclose(lin.A_imag[0], math.pi * n)
    assert torch.allclose(inv.A_imag[0], 8 / math.pi * (8 / (2 * n + 1) - 1))
    assert torch.allclose(-torch.exp(lin.log_A_real), torch.full_like(lin.log_A_real, -0.5))
    dt = torch.exp(lin.log_dt)
    assert (dt >= 0.001 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()


@pytest.mark.parametrize("causal", [True, False], ids=["left-pad", "right-pad"])
def test_edge_padding_computes_what_the_unpadded_row_computes(causal):
    m = make_mixer("s4d", causal)
    x = torch.randn(1, 9, m.d_model)
    junk = torch.randn(1, 4, m.d_model) * 5
    xp = torch.cat([junk, x], 1) if causal else torch.cat([x, junk], 1)
    keep = torch.ones(1, 13, dtype=torch.bool)
    keep[:, slice(0, 4) if causal else slice(9, 13)] = False
    for form in FORMS:
        with_form(m, form)
        y, _ = m(x)
        yp, _ = m(xp, mask=keep)
        assert rel_err(y, yp[keep][None]) <= 1e-5, form


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_long_sequence_is_stable(causal):
    m = make_mixer("s4d", causal, d_state=16)
    x = torch.randn(1, 2048, m.d_model) * 3
    with torch.no_grad():
        y_fast, _ = with_form(m, "fast")(x)
        y_ref, _ = with_form(m, "reference")(x)
    assert torch.isfinite(y_fast).all()
    assert rel_err(y_ref, y_fast) <= 1e-5


def test_bidirectional_layer_has_no_decode_state_and_bad_options_name_the_field():
    m = make_mixer("s4d", False)
    with pytest.raises(CapabilityError, match="causal=True"):
        m.init_state(1, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="s4d.dt_min"):
        make_mixer("s4d", True, dt_min=1.0, dt_max=0.1)
    with pytest.raises(ConfigError, match="s4d.init"):
        make_mixer("s4d", True, init="legs")
