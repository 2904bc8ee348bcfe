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


def test_mbconv_is_the_inverted_bottleneck_written_with_torch_convs():
    m = make_mixer("mbconv", False, expand=2.0, kernel=3).mixer
    with torch.no_grad():
        for bn in (m.norm_up, m.norm_dw):
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x, (h, w) = torch.randn(2, 35, m.d_model), (5, 7)
    grid = x.transpose(1, 2).reshape(2, -1, h, w)

    def bn(norm, t):
        return F.batch_norm(t, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)

    t = F.gelu(bn(m.norm_up, F.conv2d(grid, m.up.weight[:, :, None, None])))
    t = F.gelu(bn(m.norm_dw, F.conv2d(t, m.dw.weight, padding=1, groups=t.shape[1])))
    t = t * torch.sigmoid(m.se(t.mean((2, 3)))[:, :, None, None])
    want = F.conv2d(t, m.down.weight[:, :, None, None], m.down.bias).flatten(2).transpose(1, 2)
    for form in ("reference", "fast"):
        assert rel_err(with_form(m, form)(x, positions=_ctx(h, w))[0], want) < 1e-5


def test_a_maxvit_stage_is_mbconv_then_window_then_grid_attention():
    from efformer.models.vision import create_image_model

    stage = dict(depth=3, d_model=16, n_heads=2, mixer=["mbconv", "swin", "maxvit_grid"],
                 mixer_options=[{}, {"window": 4}, {"grid_size": 4}])
    model = create_image_model(dict(patch_size=2, positional="none", pooling="mean", stages=[stage]))
    assert [type(b.mixer).__name__ for b in model.stages[0]] == ["MBConv", "SwinAttention", "GridAttention"]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
