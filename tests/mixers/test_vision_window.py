"""Swin window attention: the shifted-window pattern against the paper's slice-and-roll construction,
padding to window multiples, windows covering the grid, and the V2 options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import ConfigError, ShapeError
from efformer.nn.positional import PositionalContext
from tests.helpers import grid_context as _ctx
from tests.helpers import make_mixer, rel_err, with_form

GRIDS = [(4, 4, 2, 1), (5, 7, 3, 1), (6, 9, 3, 2), (7, 7, 4, 2), (8, 8, 4, 2), (3, 5, 4, 2)]


def _swin_loop_pattern(h, w, window, shift) -> torch.Tensor:
    """Bool (N, N) over the padded grid, built as the released Swin code does, pixel by pixel: label the
    regions of the shifted image by three slices per axis, roll, cut windows; two pixels attend iff they
    share a window and a label."""
    wh, ww = min(window, h), min(window, w)
    sh, sw = (shift if h > window else 0), (shift if w > window else 0)
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    label = torch.zeros(hp, wp, dtype=torch.long)
    if sh or sw:
        cnt = 0
        rows = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),)
        cols = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),)
        for rs in rows:
            for cs in cols:
                label[rs, cs] = cnt
                cnt += 1
    n = hp * wp
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):  # i, j: pixels of the rolled image; the original pixel at rolled (r, c) is (r + s) mod H
        ri, ci = divmod(i, wp)
        for j in range(n):
            rj, cj = divmod(j, wp)
            if ri // wh == rj // wh and ci // ww == cj // ww and label[ri, ci] == label[rj, cj]:
                oi = ((ri + sh) % hp) * wp + (ci + sw) % wp
                oj = ((rj + sh) % hp) * wp + (cj + sw) % wp
                allowed[oi, oj] = True
    return allowed


@pytest.mark.parametrize(("h", "w", "window", "shift"), GRIDS)
def test_shifted_window_pattern_equals_the_papers_pixel_loop(h, w, window, shift):
    m = make_mixer("swin", False, window=window, shift=shift, mask_padding=False).mixer
    assert torch.equal(m.allowed_pairs(h, w), _swin_loop_pattern(h, w, window, shift))


def test_shift_changes_the_pattern_and_wraps_round():
    m0 = make_mixer("swin", False, window=4, shift=0).mixer
    m2 = make_mixer("swin", False, window=4, shift=2).mixer
    a0, a2 = m0.allowed_pairs(8, 8), m2.allowed_pairs(8, 8)
    assert not torch.equal(a0, a2)
    assert a0.sum(1).eq(16).all()  # every pixel sees its whole 4x4 window
    # the corner pixel (0, 0) wrapped round: it shares a rolled window with (6, 6) but must not see it
    assert not a2[0, 6 * 8 + 6] and a2[0, 1]


def _windows_loop(m, x, h, w):
    """Unshifted windows computed one by one on the real tokens alone (no padding at all)."""
    q, k, v = m.heads_qkv(x)
    q = q * m.head_dim ** -0.5
    y = torch.zeros_like(q)
    win = m.opts.window
    for r0 in range(0, h, win):
        for c0 in range(0, w, win):
            rows = torch.arange(r0, min(r0 + win, h))
            cols = torch.arange(c0, min(c0 + win, w))
            idx = (rows[:, None] * w + cols[None, :]).reshape(-1)
            rr, cc = idx // w, idx % w
            bias = m._bias(rr[:, None] - rr, cc[:, None] - cc)
            s = q[:, :, idx] @ k[:, :, idx].transpose(-1, -2) + bias
            y[:, :, idx] = s.softmax(-1) @ v[:, :, idx]
    return m.out_proj(m.merge_heads(y))


@pytest.mark.parametrize("form", ["reference", "fast"])
@pytest.mark.parametrize(("h", "w"), [(5, 7), (7, 3), (9, 9)])
def test_padding_to_window_multiples_is_exact(form, h, w):
    m = make_mixer("swin", False, window=4, shift=0).mixer
    with torch.no_grad():
        m.bias_table.normal_()
    x = torch.randn(2, h * w, m.d_model)
    y, _ = with_form(m, form)(x, positions=_ctx(h, w))
    assert rel_err(_windows_loop(m, x, h, w), y) < 1e-5
    # the released code's zero tokens do take part, so the result differs from the exact one
    m_zero = make_mixer("swin", False, window=4, shift=0, mask_padding=False).mixer
    m_zero.load_state_dict(m.state_dict())
    y_zero, _ = with_form(m_zero, form)(x, positions=_ctx(h, w))
    assert rel_err(y, y_zero) > 1e-3


def test_a_window_covering_the_grid_is_full_attention():
    m = make_mixer("swin", False, window=8, shift=4, position_bias="none").mixer
    h, w = 5, 7
    x = torch.randn(2, h * w, m.d_model)
    y, _ = m(x, positions=_ctx(h, w))
    q, k, v = m.heads_qkv(x)
    want = m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v)))
    assert rel_err(want, y) < 1e-5


@pytest.mark.parametrize("opts", [dict(cosine=True, position_bias="continuous"), dict(cosine=True),
                                  dict(position_bias="continuous", shift=2), dict(position_bias="none", shift=1)])
def test_v2_options_fast_matches_reference_with_gradients(opts):
    m = make_mixer("swin", False, window=4, cpb_hidden=16, **{"shift": 1, **opts}).mixer
    h, w = 7, 6
    x = torch.randn(2, h * w, m.d_model)
    outs = []
    for form in ("reference", "fast"):
        xi = x.clone().requires_grad_(True)
        y, _ = with_form(m, form)(xi, positions=_ctx(h, w))
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert rel_err(y0, y1) < 1e-5 and rel_err(gx0, gx1) < 1e-4
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(gp0, gp1, strict=True))


def test_continuous_bias_is_bounded_and_log_spaced():
    m = make_mixer("swin", False, window=5, position_bias="continuous", cpb_hidden=16).mixer
    table = m._table()
    assert table.shape == (81, m.n_heads) and (table > 0).all() and (table < 16).all()


def test_bad_options_and_missing_grid_are_refused():
    with pytest.raises(ConfigError, match="shift"):
        make_mixer("swin", False, window=4, shift=4)
    m = make_mixer("swin", False).mixer
    with pytest.raises(ShapeError, match="needs the token grid"):
        m(torch.randn(1, 12, m.d_model))
    with pytest.raises(ShapeError, match="grid 3x5 holds 15 tokens"):
        m(torch.randn(1, 12, m.d_model), positions=PositionalContext(torch.arange(12)[None], grid=(3, 5)))


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_maxvit_grid_attention_is_full_attention_on_each_strided_lattice(form):
    m = with_form(make_mixer("maxvit_grid", False, grid_size=3).mixer, form)
    h, w = 6, 9  # strides 2 and 3: nothing padded
    x = torch.randn(2, h * w, m.d_model)
    y, _ = m(x, positions=_ctx(h, w))
    y, g = y.reshape(2, h, w, -1), x.reshape(2, h, w, -1)
    for r0 in range(2):
        for c0 in range(3):
            sub = g[:, r0::2, c0::3].reshape(2, 9, -1)
            q, k, v = m.heads_qkv(sub)
            want = m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v)))
            assert rel_err(want, y[:, r0::2, c0::3].reshape(2, 9, -1)) < 1e-5


def test_maxvit_grid_covering_the_image_is_full_attention_and_padding_is_masked():
    m = make_mixer("maxvit_grid", False, grid_size=8).mixer
    x = torch.randn(2, 35, m.d_model)
    q, k, v = m.heads_qkv(x)
    want = m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v)))
    assert rel_err(want, m(x, positions=_ctx(5, 7))[0]) < 1e-5
    m3 = make_mixer("maxvit_grid", False, grid_size=3).mixer  # 5x7 pads to 6x9
    y_ref, _ = with_form(m3, "reference")(x, positions=_ctx(5, 7))
    y_fast, _ = with_form(m3, "fast")(x, positions=_ctx(5, 7))
    assert rel_err(y_ref, y_fast) < 1e-5


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_cswin_stripes_covering_the_grid_are_full_attention_and_each_token_sees_a_cross(form):
    m = with_form(make_mixer("cswin", False, stripe=9, lepe=False).mixer, form)
    x = torch.randn(2, 35, m.d_model)
    q, k, v = m.heads_qkv(x)
    want = m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v)))
    assert rel_err(want, m(x, positions=_ctx(5, 7))[0]) < 1e-5
    m1 = with_form(make_mixer("cswin", False, stripe=1, lepe=False).mixer, form)
    x = torch.randn(1, 35, m1.d_model, requires_grad=True)
    y, _ = m1(x, positions=_ctx(5, 7, 1))
    y[0, 2 * 7 + 3].sum().backward()  # token (2, 3): influenced only by its row and its column
    touched = (x.grad[0].abs().sum(-1) > 0).reshape(5, 7)
    cross = torch.zeros(5, 7, dtype=torch.bool)
    cross[2, :], cross[:, 3] = True, True
    assert torch.equal(touched, cross)


def test_cswin_fast_matches_reference_on_stripes_the_grid_cuts_short():
    m = make_mixer("cswin", False, stripe=3).mixer
    x = torch.randn(2, 35, m.d_model)
    y_ref, _ = with_form(m, "reference")(x, positions=_ctx(5, 7))
    y_fast, _ = with_form(m, "fast")(x, positions=_ctx(5, 7))
    assert rel_err(y_ref, y_fast) < 1e-5
    with pytest.raises(ConfigError, match="even"):
        make_mixer("cswin", False, n_heads=1)
