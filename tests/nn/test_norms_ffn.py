"""Norms and feed-forward blocks: every registered entry checked against its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from efformer.registry import FFNS, NORMS


@pytest.mark.parametrize("name", NORMS.names())
def test_norm_formula(name):
    norm = NORMS.get(name)(16)
    x = torch.randn(3, 5, 16) * 4 + 2
    y = norm(x)
    if name in ("layernorm", "prepbn"):  # PRepBN starts as LayerNorm (gamma = 1 at step 0)
        expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    elif name == "repbn":  # training-mode BatchNorm over every token, plus alpha (1 at init) times x
        flat = x.reshape(-1, 16)
        expected = ((flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5) + flat).reshape(x.shape)
    elif name == "groupnorm":  # torch's GroupNorm(1) on the sample as (d, n) channels x positions
        expected = F.group_norm(x.transpose(1, 2), 1, eps=1e-5).transpose(1, 2)
    else:
        expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(y, expected, atol=1e-5)


def _gelu_new(t):  # GPT-2's tanh approximation, written out
    return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))


_ACT = {"gelu": F.gelu, "gelu_tanh": _gelu_new, "relu": F.relu, "relu2": lambda t: F.relu(t) ** 2, "swiglu": F.silu,
        "geglu": F.gelu,
        "reglu": F.relu}


OWN_TESTS = ("moe", "matformer", "acm", "mixffn", "mohd", "monet")  # FFNs with test files of their own


@pytest.mark.parametrize("name", [n for n in FFNS.names() if n not in OWN_TESTS])
def test_ffn_formula_and_width(name):
    ffn = FFNS.get(name)(24, 4.0, 0.0)
    x = torch.randn(2, 3, 24)
    if name == "pattention":  # TokenFormer: GeLU of L2-normalised scores against mult * d parameter tokens
        s = x @ ffn.layer.keys.t()
        expected = F.gelu(s * 96**0.5 / s.norm(dim=-1, keepdim=True)) @ ffn.layer.values
        assert ffn.layer.n_tokens == 96 and torch.allclose(ffn(x), expected, atol=1e-6)
        return
    act = _ACT[name]
    if hasattr(ffn, "gate_up"):
        gate, up = (x @ ffn.gate_up.weight.t()).chunk(2, -1)
        expected = (act(gate) * up) @ ffn.down.weight.t()
        assert ffn.down.in_features == 64  # 2/3 * 4 * 24 keeps the MLP's parameter count
    else:
        expected = ffn.down(act(ffn.up(x)))
        assert ffn.up.out_features == 96
    assert torch.allclose(ffn(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["gelu", "swiglu"])
def test_ffn_bias_flag(name):
    ffn = FFNS.get(name)(8, 2.0, 0.0, bias=name == "swiglu")  # the opposite of each default
    biases = [m.bias is not None for m in ffn.modules() if isinstance(m, torch.nn.Linear)]
    assert biases and all(b == (name == "swiglu") for b in biases)


@pytest.mark.parametrize("name", NORMS.names())
def test_norm_eps(name):
    x = torch.tensor([[1e-3, -1e-3, 1e-3, -1e-3]])  # tiny variance and rms: eps dominates
    # eval mode: BatchNorm-based norms (repbn) then use their running statistics, which eps also enters
    assert not torch.allclose(NORMS.get(name)(4, eps=1.0).eval()(x), NORMS.get(name)(4).eval()(x))
