"""FNet and spectral gating: independent DFT oracles, exact filters (identity, shift), limits and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efformer import create_model
from efformer.errors import CapabilityError, ShapeError
from tests.helpers import make_mixer, rel_err, with_form


def _real_dft2(x: torch.Tensor) -> torch.Tensor:
    """Re(F_n X F_d^T) from cos/sin tables written out: Re(F X G^T) = C X C'^T - S X S'^T."""
    n, d = x.shape[-2:]
    kn, kd = torch.arange(n, dtype=torch.float64), torch.arange(d, dtype=torch.float64)
    an, ad = 2 * math.pi * torch.outer(kn, kn) / n, 2 * math.pi * torch.outer(kd, kd) / d
    x = x.double()
    return an.cos() @ x @ ad.cos().T - an.sin() @ x @ ad.sin().T


@pytest.mark.parametrize("form", ["reference", "fast"])
@pytest.mark.parametrize("n", [1, 7, 13, 32])
def test_fnet_is_the_real_part_of_the_2d_dft(form, n):
    m = with_form(make_mixer("fnet", False), form)
    x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(n))
    y, _ = m(x)
    assert rel_err(_real_dft2(x), y) < 1e-6
    assert rel_err(torch.from_numpy(np.fft.fft2(x.numpy(), axes=(1, 2)).real), y) < 1e-6  # a second oracle


def test_fnet_ortho_scaling_and_padding_as_zero_input():
    x = torch.randn(2, 9, 32)
    plain, _ = make_mixer("fnet", False)(x)
    ortho, _ = make_mixer("fnet", False, norm="ortho")(x)
    assert torch.allclose(ortho, plain / math.sqrt(9 * 32), atol=1e-6)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 6:] = False
    y, _ = make_mixer("fnet", False)(x, mask=keep)
    ref = _real_dft2(x * keep[..., None])
    assert rel_err(ref[keep], y[keep]) < 1e-6  # the DFT runs over n = 9 with the pads as zeros


@pytest.mark.parametrize("name", ["fnet", "spectral_gating"])
def test_spectral_mixers_are_bidirectional_only(name):
    with pytest.raises(CapabilityError, match="bidirectional only"):
        make_mixer(name, True)


def _set_filter(m, w: torch.Tensor) -> None:
    with torch.no_grad():
        m.filter.copy_(torch.view_as_real(w).expand_as(m.filter))


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_gating_with_a_flat_filter_is_the_identity(form):
    m = with_form(make_mixer("spectral_gating", False), form)
    _set_filter(m, torch.ones(m.max_len // 2 + 1, 1, dtype=torch.cfloat))
    x = torch.randn(2, 11, m.d_model)
    assert torch.allclose(m(x)[0], x, atol=1e-5)


@pytest.mark.parametrize("form", ["reference", "fast"])
@pytest.mark.parametrize("shift", [1, 3])
def test_gating_with_a_phase_ramp_shifts_the_sequence(form, shift):
    """W_f = exp(-2 pi i f s / L) delays by s; the zero padding up to L = max_len makes it a plain shift."""
    m = with_form(make_mixer("spectral_gating", False), form)
    f = torch.arange(m.max_len // 2 + 1, dtype=torch.float64)
    _set_filter(m, torch.exp(-2j * math.pi * f * shift / m.max_len).to(torch.cfloat)[:, None])
    n = m.max_len - shift
    x = torch.randn(2, n, m.d_model)
    y, _ = m(x)
    assert torch.allclose(y[:, shift:], x[:, : n - shift], atol=1e-5)
    assert torch.allclose(y[:, :shift], torch.zeros_like(y[:, :shift]), atol=1e-5)


def test_gating_refuses_sequences_longer_than_its_filter():
    m = make_mixer("spectral_gating", False)
    with pytest.raises(ShapeError, match="max_len"):
        m(torch.randn(1, m.max_len + 1, m.d_model))


@pytest.mark.parametrize("max_len", [15, 16])
def test_gating_forms_agree_for_odd_and_even_filter_lengths(max_len):
    m = make_mixer("spectral_gating", False, max_len=max_len)
    x = torch.randn(2, max_len, m.d_model, requires_grad=True)
    outs = []
    for form in ("reference", "fast"):
        y, _ = with_form(m, form)(x)
        outs.append((y, *torch.autograd.grad(y.square().sum(), [x, m.filter])))
    for a, b in zip(*outs, strict=True):
        assert rel_err(a, b) < 1e-5


def test_spectformer_stack_spectral_then_attention_builds_and_runs():
    model = create_model("classifier-tiny", mixer=["spectral_gating", "softmax"], max_len=32, n_classes=3)
    logits = model(torch.randint(0, 256, (2, 20)))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
