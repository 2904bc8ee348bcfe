"""EcoFormer: binary codes, the Hamming-affinity kernel written independently, linear == quadratic."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError, ShapeError
from efformer.registry import MIXERS
from tests.helpers import make_mixer, rel_err, with_form


def _qkv(m, x):
    q = m.split_heads(m.q_proj(x))
    k, v = m.split_heads(m.kv_proj(x), 2 * m.n_heads).chunk(2, dim=1)
    return q, k, v


def test_codes_are_binary_scale_free_and_straight_through():
    m = make_mixer("ecoformer", False, n_bits=12)
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    h = m.codes(x)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h, m.codes(3.7 * x))  # the hash sees directions only
    (h * torch.randn_like(h)).sum().backward()
    assert m.hash_weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0  # tanh's gradient passes through sign


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_is_hamming_affinity_written_out(causal):
    """y = sum_j (1 - Ham(h_i, h_j)/b) v_j / sum_j (...), with Hamming counted bit by bit, in every form."""
    m = make_mixer("ecoformer", causal, n_bits=10, n_anchors=5)
    n = 11
    x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, slice(0, 3) if causal else slice(8, None)] = False  # left padding when causal, right if not
    with torch.no_grad():
        q, k, v = _qkv(m, x)
        hq, hk = m.codes(q), m.codes(k)
        ham = (hq[..., :, None, :] != hk[..., None, :, :]).sum(-1).double()
        a = (1 - ham / m.opts.n_bits) * keep[:, None, None, :]
        if causal:
            a = a.tril()
        o = (a @ v.double()) / a.sum(-1, keepdim=True).clamp_min(1e-12)
        want = m.out_proj(m.merge_heads(o.float())) * keep[..., None]
    for form in ("reference", "chunked", "recurrent"):
        got, _ = with_form(m, form)(x, mask=keep)
        assert rel_err(want, got) < 1e-5, form


def test_linear_form_matches_quadratic_on_a_long_sequence():
    m = make_mixer("ecoformer", True, chunk=16)
    x = torch.randn(1, 77, m.d_model)
    ref, _ = with_form(m, "reference")(x)
    fast, _ = with_form(m, "chunked")(x)
    assert rel_err(ref, fast) < 1e-5


def test_hash_preserves_locality():
    """Nearby directions share more bits than unrelated ones (what makes Hamming affinity an attention kernel)."""
    m = make_mixer("ecoformer", False, n_bits=64, n_anchors=32, sigma=0.5)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 300, 8, generator=gen)
    near = x + 0.1 * x.norm(dim=-1, keepdim=True) * torch.randn(x.shape, generator=gen) / 8**0.5
    far = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        agree_near = (m.codes(x) == m.codes(near)).float().mean()
        agree_far = (m.codes(x) == m.codes(far)).float().mean()
    assert agree_near > agree_far + 0.15, (agree_near, agree_far)


def test_set_anchors_checks_its_input():
    m = make_mixer("ecoformer", False, n_anchors=6)
    m.set_anchors(torch.randn(4, 50, 8))
    assert torch.allclose(m.anchors.norm(dim=-1), torch.ones(4, 6))
    with pytest.raises(ShapeError, match="set_anchors"):
        m.set_anchors(torch.randn(4, 3, 8))


@pytest.mark.parametrize("field,value", [("n_bits", 0), ("n_anchors", 0), ("sigma", 0.0), ("chunk", 0)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"ecoformer\.{field}="):
        MIXERS.get("ecoformer")(32, 4, options={field: value})
