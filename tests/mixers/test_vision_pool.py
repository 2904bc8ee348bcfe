"""PoolFormer's pooling mixer is avg-pool minus identity (border windows averaged over real tokens);
the identity mixer returns its input."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from tests.helpers import grid_context as _ctx
from tests.helpers import make_mixer, rel_err, with_form


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_pooling_is_the_mean_of_in_grid_neighbours_minus_the_token(form):
    m = with_form(make_mixer("pool", False, pool_size=3).mixer, form)
    h, w = 4, 5
    x = torch.randn(1, h * w, m.d_model)
    y, _ = m(x, positions=_ctx(h, w, 1))
    g, out = x.reshape(h, w, -1), y.reshape(h, w, -1)
    corner = g[:2, :2].reshape(4, -1).mean(0) - g[0, 0]  # the corner's window holds 4 real tokens
    inner = g[1:4, 2:5].reshape(9, -1).mean(0) - g[2, 3]
    assert rel_err(corner, out[0, 0]) < 1e-6 and rel_err(inner, out[2, 3]) < 1e-6


def test_a_constant_image_pools_to_zero_and_even_windows_are_refused():
    m = make_mixer("pool", False, pool_size=5).mixer
    y, _ = m(torch.ones(1, 12, m.d_model), positions=_ctx(3, 4, 1))
    assert y.abs().max() < 1e-6
    with pytest.raises(ConfigError, match="pool_size"):
        make_mixer("pool", False, pool_size=4)


def test_identity_mixer_returns_its_input():
    m = make_mixer("identity", False).mixer
    x = torch.randn(2, 15, m.d_model)
    assert torch.equal(m(x, positions=_ctx(3, 5))[0], x)
