"""RMT's Manhattan self-attention: gamma = 1 is softmax attention, the decay is gamma to the Manhattan
distance (checked pair by pair), and both forms agree in the full and the decomposed variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import grid_context as _ctx
from tests.helpers import make_mixer, rel_err, with_form


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_gamma_one_full_form_is_softmax_attention(form):
    m = with_form(make_mixer("manhattan", False, decomposed=False, gamma=1.0).mixer, form)
    x = torch.randn(2, 35, m.d_model)
    q, k, v = m.heads_qkv(x)
    assert rel_err(m.out_proj(m.merge_heads(F.scaled_dot_product_attention(q, k, v))), m(x, positions=_ctx(5, 7))[0]) \
        < 1e-5


def test_full_form_weights_are_softmax_times_gamma_to_the_manhattan_distance():
    m = make_mixer("manhattan", False, decomposed=False).mixer
    h, w = 3, 4
    x = torch.randn(1, h * w, m.d_model)
    q, k, v = m.heads_qkv(x)
    probs = (q @ k.transpose(-1, -2) * m.head_dim ** -0.5).softmax(-1)[0]
    gammas = m.log_gamma.exp()
    assert (gammas < 1).all() and gammas.unique().numel() == m.n_heads
    out = torch.zeros_like(v[0])
    for hd in range(m.n_heads):
        for i in range(h * w):
            for j in range(h * w):
                dist = abs(i // w - j // w) + abs(i % w - j % w)
                out[hd, i] += probs[hd, i, j] * gammas[hd] ** dist * v[0, hd, j]
    assert rel_err(m.out_proj(m.merge_heads(out[None])), m(x, positions=_ctx(h, w, 1))[0]) < 1e-5


@pytest.mark.parametrize("decomposed", [False, True])
def test_fast_matches_reference_with_gradients(decomposed):
    m = make_mixer("manhattan", False, decomposed=decomposed, gamma=0.8).mixer
    x = torch.randn(2, 6 * 5, m.d_model)
    res = []
    for form in ("reference", "fast"):
        xi = x.clone().requires_grad_(True)
        y, _ = with_form(m, form)(xi, positions=_ctx(6, 5))
        y.square().sum().backward()
        res.append((y.detach(), xi.grad))
    assert rel_err(res[0][0], res[1][0]) < 1e-5 and rel_err(res[0][1], res[1][1]) < 1e-4


def test_decomposed_on_a_single_row_is_one_1d_pass():
    """On a 1 x w grid the column pass sees one token (weight 1), so only the row pass mixes."""
    m = make_mixer("manhattan", False, decomposed=True, gamma=0.9).mixer
    full = make_mixer("manhattan", False, decomposed=False, gamma=0.9).mixer
    full.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, m.d_model)
    assert rel_err(full(x, positions=_ctx(1, 7))[0], m(x, positions=_ctx(1, 7))[0]) < 1e-5
