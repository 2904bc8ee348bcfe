"""Pattention: growth with zero-key parameter tokens keeps outputs exactly (for the paper's L2-GeLU
normalisation with tau kept), not for softmax or a recomputed tau; new keys still learn; the FFN."""

from __future__ import annotations

import math

import pytest
import torch

from efformer import create_model
from efformer.errors import ConfigError
from efformer.nn.pattention import Pattention


def _layer(normalization="l2_gelu"):
    torch.manual_seed(0)
    return Pattention(16, 12, 10, normalization=normalization, init_std=1.0)


def test_theta_is_gelu_of_l2_normalised_scores_times_tau():
    layer = _layer()
    x = torch.randn(3, 5, 16)
    s = x @ layer.keys.T
    expected = torch.nn.functional.gelu(s * math.sqrt(10) / s.norm(dim=-1, keepdim=True)) @ layer.values
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_growth_with_zero_tokens_keeps_outputs_exactly():
    layer = _layer()
    x = torch.randn(3, 5, 16)
    before = layer(x)
    layer.grow(7)
    assert layer.n_tokens == 17 and float(layer.scale) == pytest.approx(math.sqrt(10))
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-6)
    assert (layer.scores(x)[..., 10:] == 0).all()  # GeLU(0) = 0: the new tokens get no weight


def test_growth_changes_outputs_with_softmax_or_a_recomputed_tau():
    x = torch.randn(3, 5, 16)
    soft = _layer("softmax")
    before = soft(x)
    soft.grow(7)
    assert (soft(x) - before).abs().max() > 1e-3  # exp(0) = 1 takes weight from the old tokens
    layer = _layer()
    before = layer(x)
    layer.grow(7)
    layer.scale.fill_(math.sqrt(17))  # tau recomputed from the new n
    assert (layer(x) - before).abs().max() > 1e-3


def test_new_keys_learn_after_growth_while_new_values_start_silent():
    layer = _layer()
    layer.grow(4)
    x = torch.randn(3, 5, 16)
    (layer(x) * torch.randn(3, 5, 12)).sum().backward()
    assert (layer.keys.grad[10:].abs().sum(-1) > 0).all()
    assert (layer.values.grad[10:] == 0).all()


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError, match="n_param_tokens"):
        Pattention(4, 4, 0)
    with pytest.raises(ConfigError, match="normalization"):
        Pattention(4, 4, 3, normalization="relu")
    with pytest.raises(ConfigError, match="n_new"):
        _layer().grow(0)


def test_pattention_ffn_in_a_model():
    model = create_model("lm-tiny", mixer="tokenformer", ffn="pattention", d_model=32, n_heads=4, max_len=64,
                         mixer_options={"n_param_tokens": 16})
    logits = model(torch.randint(0, 256, (2, 9)))
    assert logits.shape == (2, 9, 256) and torch.isfinite(logits).all()
