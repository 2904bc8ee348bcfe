"""Perplexity protocol: non-overlapping windows equal a direct computation; strides score each token once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import efformer
from efformer.compress.evaluate import perplexity
from efformer.errors import ConfigError, DataError


class Uniform(nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, 256)


def test_uniform_model_has_vocab_perplexity_under_any_stride():
    ids = torch.randint(0, 256, (300,))
    for stride in (None, 1, 7, 32):
        assert perplexity(Uniform(), ids, 32, stride) == pytest.approx(256, rel=1e-6)


def test_non_overlapping_windows_equal_the_direct_sum():
    torch.manual_seed(0)
    m = efformer.create_model("lm-tiny", d_model=32, n_layers=1, n_heads=2).eval()
    ids = torch.randint(0, 256, (100,))
    x = ids[:96].view(3, 32)
    with torch.no_grad():
        nll = F.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert perplexity(m, ids, 32) == pytest.approx(math.exp(nll.item()), rel=1e-5)
    # overlapping windows give every later token more context; with a random model the value just has to exist
    assert math.isfinite(perplexity(m, ids, 32, 8))


def test_bad_windows_are_refused():
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(Uniform(), torch.zeros(5, dtype=torch.long), 8)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(Uniform(), torch.zeros(50, dtype=torch.long), 8, 9)
