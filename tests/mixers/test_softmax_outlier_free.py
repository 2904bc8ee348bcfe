"""Outlier-free attention options of the softmax mixer: softmax_1, clipped softmax, gated attention.

Each variant passes the contract checks (fast == reference on outputs and gradients over odd lengths
and padding, cached decode == full forward), and each matches its definition or its exact limit.
"""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.softmax import SoftmaxAttention
from efformer.nn.positional import build_positional
from efformer.registry import MIXERS
from tests.helpers import make_mixer, with_form
from tests.mixers.test_contract import _check_decode, _check_fast_forms_match_reference

VARIANTS = [dict(normalizer="softmax1"), dict(normalizer="clipped", clip_zeta=1.1, clip_gamma=-0.05),
            dict(gated=True), dict(normalizer="softmax1", gated=True, n_kv_heads=2)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_variants_keep_the_mixer_contract(opts, causal):
    m = make_mixer("softmax", causal, **opts)
    if opts.get("gated"):
        with torch.no_grad():
            torch.nn.init.normal_(m.gate.weight)  # gates far from 1/2, so the gate matters
    _check_fast_forms_match_reference(m, "softmax", causal)
    if causal:
        _check_decode(m, "softmax")


def _scores_and_values(m, x):
    q, k, v = m._qkv(x, _no_positions(x))
    return (q @ k.transpose(-1, -2)) / math.sqrt(m.head_dim), v


def _no_positions(x):
    return build_positional("none", x.shape[-1], 4, 64, False).context(
        torch.arange(x.shape[1]).expand(x.shape[0], -1), x.dtype)


def test_softmax1_is_softmax_with_an_extra_zero_logit_and_value():
    torch.manual_seed(0)
    m = SoftmaxAttention(32, 4, causal=False, options={"normalizer": "softmax1"}).eval()
    x = torch.randn(2, 9, 32) * 3
    s, v = _scores_and_values(m, x)
    p = torch.cat([s, torch.zeros(*s.shape[:3], 1)], -1).softmax(-1)[..., :-1]
    ref = m.out_proj(m.merge_heads(p @ v))
    for form in ("reference", "fast"):
        assert torch.allclose(with_form(m, form)(x)[0], ref, atol=1e-5)
    assert (m._normalize(s).sum(-1) < 1).all()  # a head may attend to (almost) nothing


def test_clipped_softmax_limits():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    plain = SoftmaxAttention(32, 4, causal=True).eval()
    unit = SoftmaxAttention(32, 4, causal=True, options={"normalizer": "clipped"}).eval()  # zeta 1, gamma 0
    unit.load_state_dict(plain.state_dict())
    assert torch.equal(unit(x)[0], with_form(plain, "reference")(x)[0])
    clip = SoftmaxAttention(32, 4, causal=False, options={"normalizer": "clipped", "clip_gamma": -0.1,
                                                          "clip_zeta": 1.1})
    s = torch.tensor([[[[0.0, 0.0, 10.0, -10.0]]]])
    p = clip._normalize(s)
    assert p[0, 0, 0, 3] == 0 and p[0, 0, 0, 2] == 1  # exact zeros and ones without infinite logits


def test_open_gates_give_plain_attention():
    torch.manual_seed(2)
    plain = SoftmaxAttention(32, 4, causal=True).eval()
    gated = SoftmaxAttention(32, 4, causal=True, options={"gated": True}).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.fill_(40.0)  # sigmoid(40) == 1 in float32
    x = torch.randn(2, 5, 32)
    assert torch.equal(gated(x)[0], plain(x)[0])


def test_defaults_are_plain_softmax_and_bad_values_are_refused():
    opts = MIXERS.get("softmax").Options()
    assert (opts.normalizer, opts.gated, opts.clip_zeta, opts.clip_gamma) == ("softmax", False, 1.0, 0.0)
    with pytest.raises(ConfigError, match="clip_zeta"):
        SoftmaxAttention(32, 4, causal=True, options={"normalizer": "clipped", "clip_zeta": 0.5})
    with pytest.raises(ConfigError, match="normalizer"):
        MIXERS.get("sliding_window")(32, 4, causal=True, options={"normalizer": "softmax1"})
