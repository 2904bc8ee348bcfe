"""TokenFormer attention: grown with zero-key parameter tokens == before growth (full forward and decode),
a grown layer rebuilds from its config, bad options refused."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from tests.helpers import make_mixer, with_form
from tests.mixers.test_contract import _check_decode


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("form", ["reference", "fast"])
def test_growth_keeps_outputs(causal, form):
    m = with_form(make_mixer("tokenformer", causal), form)
    x = torch.randn(2, 11, 32)
    keep = torch.rand(2, 11) > 0.3
    keep[:, -1 if causal else 0] = True
    before = [m(x)[0], m(x, mask=keep)[0]]
    m.grow(40)
    assert m.q_proj.n_tokens == m.kv_proj.n_tokens == m.out_proj.n_tokens == 64
    after = [m(x)[0], m(x, mask=keep)[0]]
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_grown_layer_still_decodes_and_rebuilds_from_its_config():
    m = make_mixer("tokenformer", True)
    m.grow(8)
    _check_decode(m, "tokenformer")
    rebuilt = make_mixer("tokenformer", True, n_param_tokens=32, scale=24**0.5)
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 32)
    assert torch.equal(with_form(rebuilt, "fast")(x)[0], with_form(m, "fast")(x)[0])


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="qkv_bias"):
        make_mixer("tokenformer", True, qkv_bias=True)
    with pytest.raises(ConfigError, match="n_param_tokens"):
        make_mixer("tokenformer", True, n_param_tokens=0)
    with pytest.raises(ConfigError, match="scale"):
        make_mixer("tokenformer", True, scale=-1.0)
