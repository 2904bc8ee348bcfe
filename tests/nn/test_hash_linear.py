"""MemoryFormer's memory layer: the gather == the explicit one-hot table lookup (outputs, gradients),
p(z) == its definition summed over every sign vector, tables get p * dL/dy at the rows read only."""

from __future__ import annotations

import itertools

import pytest
import torch

from efformer.errors import ConfigError
from efformer.nn.hash_linear import HashLinear
from tests.helpers import make_mixer


def _layer(bits=4, d_in=12, d_out=5, temperature=1.0):
    torch.manual_seed(0)
    return HashLinear(d_in, d_out, bits, temperature)


def test_codes_read_the_sign_pattern_as_binary():
    layer = _layer(bits=3, d_in=6)
    x = torch.tensor([[1.0, -2.0, 3.0, -1.0, -1.0, 0.5]])  # chunks (+,-,+) and (-,-,+)
    assert layer.codes(x).tolist() == [[1 + 4, 4]]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_bucket_weight_equals_its_definition_over_all_sign_vectors(temperature):
    layer = _layer(temperature=temperature)
    x = torch.randn(7, 12, dtype=torch.float64)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)  # (16, 4)
    z = x.unflatten(-1, (3, 4))
    own = (z.sign() * z).sum(-1) / temperature
    every = (z @ signs.T) / temperature  # (7, 3, 16)
    expected = torch.exp(own - torch.logsumexp(every, -1))
    assert torch.allclose(layer.probabilities(x), expected, atol=1e-12)


def test_gather_equals_the_explicit_lookup_on_outputs_and_gradients():
    layer = _layer().double()
    for shape in ((1, 12), (3, 7, 12)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        g = torch.randn(*shape[:-1], 5, dtype=torch.float64)
        outs = []
        for fn in (layer.reference, layer.forward):
            y = fn(x)
            outs.append((y, *torch.autograd.grad((y * g).sum(), [x, layer.tables])))
        for a, b in zip(*outs, strict=True):
            assert torch.allclose(a, b, atol=1e-12)


def test_tables_get_p_times_the_output_gradient_at_the_rows_read_and_nothing_else():
    layer = _layer().double()
    x = torch.randn(6, 12, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    expected = torch.zeros_like(layer.tables)
    codes, p = layer.codes(x), layer.probabilities(x)
    for t in range(6):
        for k in range(3):
            expected[k, codes[t, k]] += p[t, k] * g[t]
    assert torch.allclose(layer.tables.grad, expected, atol=1e-12)
    assert (layer.tables.grad.abs().sum(-1) > 0).sum() <= 6 * 3  # only rows that were read


def test_output_is_the_weighted_sum_of_the_rows_read():
    layer = _layer()
    x = torch.randn(4, 12)
    codes, p = layer.codes(x), layer.probabilities(x)
    expected = sum(p[:, k, None] * layer.tables[k, codes[:, k]] for k in range(3))
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError, match="divide"):
        HashLinear(10, 4, bits=4)
    with pytest.raises(ConfigError, match="bits"):
        HashLinear(16, 4, bits=0)
    with pytest.raises(ConfigError, match="temperature"):
        HashLinear(16, 4, bits=4, temperature=0.0)
    with pytest.raises(ConfigError, match="memoryformer.bits"):
        make_mixer("memoryformer", True, bits=5)
    with pytest.raises(ConfigError, match="qkv_bias"):
        make_mixer("memoryformer", True, qkv_bias=True)
