"""Spatial-reduction attention: ratio 1 (and a pool as large as the grid) == full attention; the
paper's patch flattening == the strided convolution; the cost falls with the ratio."""

from __future__ import annotations

import pytest
import torch

from efformer.mixers.vision_grid import dense_attention
from tests.helpers import LargestTensor, make_mixer, rel_err, with_form
from tests.helpers import grid_context as _ctx


def _full(m, x, keys_from, normed=False):
    k, v = m.kv_proj(keys_from if normed else m.norm(keys_from)).chunk(2, -1)
    y = dense_attention(m.split_heads(m.q_proj(x)), m.split_heads(k), m.split_heads(v), None)
    return m.out_proj(m.merge_heads(y))


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_ratio_one_is_full_attention(form):
    m = make_mixer("sra", False, ratio=1).mixer
    h, w = 5, 7
    x = torch.randn(2, h * w, m.d_model)
    y, _ = with_form(m, form)(x, positions=_ctx(h, w))
    assert rel_err(_full(m, x, x), y) < 1e-5


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_a_pool_as_large_as_the_grid_is_full_attention_over_projected_tokens(form):
    m = make_mixer("linear_sra", False, pool=6).mixer
    x = torch.randn(2, 36, m.d_model)
    y, _ = with_form(m, form)(x, positions=_ctx(6, 6))
    # PVT v2's order: 1x1 projection, LayerNorm, GELU
    assert rel_err(_full(m, x, torch.nn.functional.gelu(m.norm(m.proj(x))), normed=True), y) < 1e-5


@pytest.mark.parametrize(("h", "w", "ratio"), [(8, 8, 4), (7, 9, 2), (5, 5, 3), (2, 9, 4)])
def test_patch_flattening_equals_the_strided_convolution(h, w, ratio):
    m = make_mixer("sra", False, ratio=ratio).mixer
    x = torch.randn(2, h * w, m.d_model)
    y_ref, _ = with_form(m, "reference")(x, positions=_ctx(h, w))
    y_fast, _ = with_form(m, "fast")(x, positions=_ctx(h, w))
    assert rel_err(y_ref, y_fast) < 1e-5


def test_reduction_keeps_one_key_per_patch():
    m = with_form(make_mixer("sra", False, ratio=4).mixer, "fast")
    h = w = 16
    with LargestTensor() as t, torch.no_grad():
        m(torch.randn(1, h * w, m.d_model), positions=_ctx(h, w, 1))
    assert t.largest <= m.n_heads * (h * w) * (h * w // 16)  # scores N x N/R^2, not N x N
