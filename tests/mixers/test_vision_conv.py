"""CvT convolutional projections: a 1x1 kernel with stride 1 and an identity norm is plain attention;
the strided key/value convolutions keep ceil(h/s) x ceil(w/s) keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from efformer.nn.positional import PositionalContext
from tests.helpers import LargestTensor, make_mixer, rel_err, with_form
from tests.helpers import grid_context as _ctx


def test_pointwise_unstrided_projections_are_plain_attention():
    m = make_mixer("cvt", False, kernel=1, kv_stride=1).mixer
    x = torch.randn(2, 35, m.d_model)
    with torch.no_grad():
        for p in (m.q_conv, m.k_conv, m.v_conv):
            p.conv.weight.fill_(1.0)  # eval BatchNorm with fresh statistics is ~identity (eps aside)
    y, _ = m(x, positions=_ctx(5, 7))
    s = (1 + m.q_conv.norm.eps) ** -0.5

    def proj(p):
        return m.split_heads(p.proj(x * s))

    want = m.out_proj(m.merge_heads(F.scaled_dot_product_attention(proj(m.q_conv), proj(m.k_conv), proj(m.v_conv))))
    assert rel_err(want, y) < 1e-5


def test_strided_keys_and_both_forms_agree_on_odd_grids():
    m = make_mixer("cvt", False, kernel=3, kv_stride=2).mixer
    with torch.no_grad():
        for p in (m.q_conv, m.k_conv, m.v_conv):
            p.norm.running_mean.normal_()
            p.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 35, m.d_model)
    g = x.reshape(2, 5, 7, -1)
    assert m.k_conv(g, loop=False).shape == (2, 3 * 4, m.d_model)
    assert rel_err(m.k_conv(g, loop=False), m.k_conv(g, loop=True)) < 1e-5
    y_ref, _ = with_form(m, "reference")(x, positions=_ctx(5, 7))
    y_fast, _ = with_form(m, "fast")(x, positions=_ctx(5, 7))
    assert rel_err(y_ref, y_fast) < 1e-5
    with LargestTensor() as t, torch.no_grad():
        with_form(m, "fast")(torch.randn(1, 256, m.d_model), positions=_ctx(16, 16, 1))
    assert t.largest < 256 * 256  # scores over N/4 keys, never N x N


def test_leading_tokens_skip_the_convolutions_and_both_forms_agree():
    m = make_mixer("cvt", False, kernel=3, kv_stride=2, leading_tokens=1, scale="width").mixer
    x = torch.randn(2, 1 + 35, m.d_model, requires_grad=True)
    pos = PositionalContext(torch.arange(36).expand(2, -1), grid=(5, 7))  # the grid after one class token
    y_ref, _ = with_form(m, "reference")(x, positions=pos)
    g_ref = torch.autograd.grad(y_ref.square().sum(), x)[0]
    y_fast, _ = with_form(m, "fast")(x, positions=pos)
    g_fast = torch.autograd.grad(y_fast.square().sum(), x)[0]
    assert rel_err(y_ref, y_fast) < 1e-5 and rel_err(g_ref, g_fast) < 1e-5
    q = m.split_heads(m.q_conv.proj(x[:, :1]))  # the class token's query: its own pointwise map, unconvolved
    k = m.split_heads(m.k_conv(x[:, 1:].reshape(2, 5, 7, -1), False, x[:, :1]))
    v = m.split_heads(m.v_conv(x[:, 1:].reshape(2, 5, 7, -1), False, x[:, :1]))
    want = m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v, scale=m.d_model ** -0.5)))
    assert rel_err(want, y_fast[:, :1]) < 1e-5
