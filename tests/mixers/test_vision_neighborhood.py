"""Neighbourhood attention: the window of each query, a kernel covering the grid == full attention,
and dilation == plain neighbourhood attention on each residue sub-grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.mixers.vision_neighborhood import axis_neighbours
from tests.helpers import LargestTensor, make_mixer, rel_err, with_form
from tests.helpers import grid_context as _ctx


@pytest.mark.parametrize(("length", "kernel"), [(9, 3), (10, 5), (7, 7), (11, 4)])
def test_each_position_gets_kernel_nearest_neighbours_slid_inside_at_borders(length, kernel):
    idx, ok = axis_neighbours(length, kernel, 1)
    assert ok.all()
    for i in range(length):
        nb = idx[i].tolist()
        assert len(set(nb)) == kernel and i in nb and min(nb) >= 0 and max(nb) < length
        assert nb == list(range(nb[0], nb[0] + kernel))  # contiguous
        if kernel // 2 <= i < length - (kernel - 1 - kernel // 2):
            assert nb[0] == i - kernel // 2  # centred away from the borders


def test_dilated_neighbours_share_the_residue_and_short_axes_give_all_members():
    idx, ok = axis_neighbours(11, 3, 3)
    for i in range(11):
        assert (idx[i][ok[i]] % 3 == i % 3).all() and ok[i].sum() == 3
    idx, ok = axis_neighbours(4, 5, 1)  # axis shorter than the kernel: every position, once
    assert ok.sum(1).eq(4).all() and all(sorted(idx[i][ok[i]].tolist()) == [0, 1, 2, 3] for i in range(4))


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_a_kernel_covering_the_grid_is_full_attention(form):
    m = make_mixer("neighborhood", False, kernel=7, dilation=1, position_bias=False).mixer
    h, w = 5, 7
    x = torch.randn(2, h * w, m.d_model)
    y, _ = with_form(m, form)(x, positions=_ctx(h, w))
    q, k, v = m.heads_qkv(x)
    assert rel_err(m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v))), y) < 1e-5


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_dilation_is_neighbourhood_attention_on_each_residue_subgrid(form):
    dil = 2
    m = make_mixer("neighborhood", False, kernel=3, dilation=dil).mixer
    plain = make_mixer("neighborhood", False, kernel=3, dilation=1).mixer
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        m.rpb.normal_()
        plain.rpb.copy_(m.rpb)
    h, w = 7, 9
    x = torch.randn(2, h * w, m.d_model)
    y, _ = with_form(m, form)(x, positions=_ctx(h, w))
    y = y.reshape(2, h, w, -1)
    g = x.reshape(2, h, w, -1)
    for r0 in range(dil):
        for c0 in range(dil):
            sub = g[:, r0::dil, c0::dil]
            sh, sw = sub.shape[1:3]
            want, _ = plain(sub.reshape(2, sh * sw, -1), positions=_ctx(sh, sw))
            assert rel_err(want, y[:, r0::dil, c0::dil].reshape(2, sh * sw, -1)) < 1e-5


def test_fast_matches_reference_with_bias_at_odd_grids_and_long_kernels():
    for opts, (h, w) in [(dict(kernel=5, dilation=1), (7, 11)), (dict(kernel=3, dilation=3), (8, 5))]:
        m = make_mixer("neighborhood", False, **opts).mixer
        with torch.no_grad():
            m.rpb.normal_()
        x = torch.randn(2, h * w, m.d_model)
        y_ref, _ = with_form(m, "reference")(x, positions=_ctx(h, w))
        y_fast, _ = with_form(m, "fast")(x, positions=_ctx(h, w))
        assert rel_err(y_ref, y_fast) < 1e-5


def test_fast_form_memory_grows_with_kernel_not_grid():
    m = with_form(make_mixer("neighborhood", False, kernel=3, dilation=1).mixer, "fast")
    h = w = 24
    with LargestTensor() as t, torch.no_grad():
        m(torch.randn(1, h * w, m.d_model), positions=_ctx(h, w, 1))
    assert t.largest < (h * w) ** 2  # never an N x N score matrix
