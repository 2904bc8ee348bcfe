"""Cross-covariance attention: a (d_h x d_h) channel map, so token order does not matter to it and its
largest tensor stays linear in the tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers import LargestTensor, make_mixer, rel_err


def test_matches_a_per_head_loop_over_channel_pairs():
    m = make_mixer("xca", False)
    with torch.no_grad():
        m.temperature.uniform_(0.5, 2.0)
    x = torch.randn(1, 9, m.d_model)
    y, _ = m(x)
    q, k, v = m.qkv(x)[0].chunk(3, -1)
    hd, out = m.head_dim, torch.zeros(9, m.d_model)
    for h in range(m.n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh, vh = F.normalize(q[:, sl], dim=0), F.normalize(k[:, sl], dim=0), v[:, sl]
        a = torch.stack([torch.stack([qh[:, i] @ kh[:, j] for j in range(hd)]) for i in range(hd)])
        a = (a * m.temperature[h, 0, 0]).softmax(-1)
        out[:, sl] = vh @ a.T
    assert rel_err(m.out_proj(out)[None], y) < 1e-5


def test_token_permutation_permutes_the_output():
    m = make_mixer("xca", False)
    x = torch.randn(2, 11, m.d_model)
    perm = torch.randperm(11)
    assert rel_err(m(x)[0][:, perm], m(x[:, perm])[0]) < 1e-5


def test_memory_is_linear_in_tokens():
    m = make_mixer("xca", False)
    n = 512
    with LargestTensor() as t, torch.no_grad():
        m(torch.randn(1, n, m.d_model))
    assert t.largest <= 3 * n * m.d_model
