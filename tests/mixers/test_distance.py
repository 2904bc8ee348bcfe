"""Lipschitz distance attention: the bound holds on random and adversarial pairs (contractive: ratio
<= 1), the fast form's expansion equals the distances, W0 is right, padding uses each row's count."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import CapabilityError
from efformer.mixers.distance import lambert_w0
from tests.helpers import make_mixer, rel_err, with_form


def _ratios(m, x, x2, mask=None) -> torch.Tensor:
    """Per batch row ||F(x) - F(x2)|| / ||x - x2|| over the real tokens."""
    y, _ = m(x, mask=mask)
    y2, _ = m(x2, mask=mask)
    keep = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    k = keep[..., None].to(x.dtype)
    return ((y - y2) * k).flatten(1).norm(dim=1) / ((x - x2) * k).flatten(1).norm(dim=1)


def test_lambert_w0():
    z = torch.tensor([0.0, 0.1, 1 / math.e, 1.0, 10.0, 1e4])
    w = lambert_w0(z)
    assert torch.allclose(w * w.exp(), z.double(), rtol=1e-12, atol=1e-14)
    assert w[3].item() == pytest.approx(0.5671432904097838)  # the omega constant


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_contractive_layer_never_expands_random_pairs(form):
    gen = torch.Generator().manual_seed(0)
    for seed in range(3):
        torch.manual_seed(seed)
        m = with_form(make_mixer("l2_attention", False), form)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(3.0)  # larger weights: sharper attention, a larger raw constant
        for n in (1, 5, 17):
            for scale in (1e-3, 0.3, 3.0):
                x = torch.randn(4, n, 32, generator=gen) * 2
                x2 = x + torch.randn(x.shape, generator=gen) * scale
                assert (_ratios(m, x, x2) <= 1.0 + 1e-5).all()


def test_bound_holds_against_adversarial_perturbations():
    """Gradient ascent on ||F(x + d) - F(x)|| / ||d||: the worst ratio found stays under the bound."""
    torch.manual_seed(1)
    m = make_mixer("l2_attention", False, contractive=False).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    d = (torch.randn_like(x) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([d], lr=0.02)
    best = 0.0
    for _ in range(60):
        ratio = (m(x + d)[0] - m(x)[0]).norm() / d.norm()
        best = max(best, ratio.item())
        opt.zero_grad()
        (-ratio).backward()
        opt.step()
    bound = m.lipschitz_bound(6).item()
    assert 0 < best <= bound
    contractive = make_mixer("l2_attention", False).double()
    contractive.load_state_dict(m.state_dict())
    assert _ratios(contractive, x, x + d.detach()).item() <= 1.0 + 1e-9


def test_fast_expansion_equals_explicit_distances_without_scaling():
    m = make_mixer("l2_attention", False, contractive=False)
    x = torch.randn(2, 9, 32) * 3
    ref, _ = with_form(m, "reference")(x)
    fast, _ = with_form(m, "fast")(x)
    assert rel_err(ref, fast) < 1e-5


def test_padding_scales_each_row_by_its_own_count():
    m = make_mixer("l2_attention", False)
    x = torch.randn(2, 10, 32)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 6:] = False
    y, _ = m(x, mask=keep)
    alone, _ = m(x[1:, :6])
    assert torch.allclose(y[1, :6], alone[0], atol=1e-5)  # padding changes nothing, not even the bound


def test_bidirectional_only():
    with pytest.raises(CapabilityError, match="bidirectional only"):
        make_mixer("l2_attention", True)
