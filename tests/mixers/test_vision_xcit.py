"""Cross-covariance attention: a (d_h x d_h) channel map, so token order does not matter to it and its
largest tensor stays linear in the tokens. XCiT's local patch interaction: its convolutions equal a per-pixel
loop, it is exactly local (a 5x5 neighbourhood), and class tokens skip it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import ShapeError
from efformer.mixers.vision_xcit import LocalPatchInteraction
from efformer.nn.positional import PositionalContext
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


def _lpi(d=6, seed=0):
    """An LPI branch with random weights and BatchNorm statistics (so no part of it is an identity)."""
    torch.manual_seed(seed)
    lpi = LocalPatchInteraction(d)
    with torch.no_grad():
        for p in lpi.parameters():
            p.uniform_(-1, 1)
        lpi.norm.running_mean.uniform_(-0.5, 0.5)
        lpi.norm.running_var.uniform_(0.5, 2.0)
    return lpi


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("h", "w", "k"), [(1, 1, 0), (5, 7, 1), (3, 1, 2), (4, 4, 0), (2, 9, 1)])
def test_lpi_fast_equals_the_per_pixel_loop_on_outputs_and_gradients(h, w, k, train):
    lpi = _lpi().train(train)
    x = torch.randn(2, k + h * w, 6, dtype=torch.float64, requires_grad=True)
    lpi = lpi.double()
    pos = PositionalContext(torch.arange(k + h * w).expand(2, -1), grid=(h, w))
    outs, grads = [], []
    for form in ("fast", "reference"):
        y = lpi(x, pos, form=form)
        (gx,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), x)
        outs.append(y), grads.append(gx)
    assert rel_err(outs[1], outs[0]) < 1e-10 and rel_err(grads[1], grads[0]) < 1e-10
    if k:  # class tokens get no LPI update, and the grid's update never reads them
        assert outs[0][:, :k].abs().max() == 0 and grads[0][:, :k].abs().max() == 0


def test_lpi_on_a_single_patch_is_the_centre_taps_alone():
    """A 1x1 grid: zero padding leaves only the centre taps, out = b2 + w2 * BN(gelu(b1 + w1 x))."""
    lpi = _lpi().eval()
    x = torch.randn(3, 1, 6)
    bn = lpi.norm
    c1, c2 = lpi.conv1, lpi.conv2
    mid = F.gelu(c1.bias + c1.weight[:, 0, 1, 1] * x)
    mid = (mid - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias
    want = c2.bias + c2.weight[:, 0, 1, 1] * mid
    got = lpi(x, PositionalContext(torch.zeros(3, 1, dtype=torch.long), grid=(1, 1)))
    assert rel_err(want, got) < 1e-6


def test_lpi_is_exactly_local_two_3x3_convs_see_a_5x5_neighbourhood():
    """Changing patch (r0, c0) changes output patch (r, c) iff max(|r - r0|, |c - c0|) <= 2 (eval mode:
    BatchNorm is a per-channel affine map then; in training its batch statistics read every patch)."""
    lpi, (h, w) = _lpi().eval(), (7, 8)
    pos = PositionalContext(torch.arange(h * w)[None], grid=(h, w))
    x = torch.randn(1, h * w, 6)
    y = lpi(x, pos)
    for r0, c0 in [(0, 0), (3, 4), (6, 7), (2, 6)]:
        moved = x.clone()
        moved[0, r0 * w + c0] += 5.0
        changed = (lpi(moved, pos) - y).abs().amax(-1)[0].reshape(h, w) > 0
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        near = torch.maximum((r - r0).abs(), (c - c0).abs()) <= 2
        assert torch.equal(changed, near), (r0, c0)


def test_lpi_refuses_a_missing_or_wrong_grid():
    lpi = _lpi()
    x = torch.randn(1, 10, 6)
    with pytest.raises(ShapeError, match="stages\\[i\\].lpi=True"):
        lpi(x, PositionalContext(torch.arange(10)[None]))
    with pytest.raises(ShapeError, match="10 tokens with grid \\(4, 4\\)"):  # fewer tokens than the grid
        lpi(x, PositionalContext(torch.arange(10)[None], grid=(4, 4)))
    with pytest.raises(ShapeError, match="at most the class and distillation"):  # 7 leading tokens: a wrong grid
        lpi(x, PositionalContext(torch.arange(10)[None], grid=(1, 3)))
