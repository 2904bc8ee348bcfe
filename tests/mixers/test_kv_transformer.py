"""Key-Value attention: symmetric logits (a reversible attention matrix), no query weights, the
asymmetric table breaks symmetry, forms agree with a trained-looking table, decode, bad options."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError, ShapeError
from tests.helpers import make_mixer, rel_err, with_form
from tests.mixers.test_contract import _check_decode, _check_fast_forms_match_reference

N = 8


def _probe_attention(m) -> torch.Tensor:
    """The attention matrix P (n, n) of a one-head mixer, read off its output.

    Tokens carry a one-hot e_j in the first N coordinates and random content elsewhere; the value
    projection copies the one-hot and the output projection is the identity, so y_i[:N] = P_i.
    """
    d = m.d_model
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.eye(N), torch.randn(N, d - N, generator=gen)], -1)[None]
    with torch.no_grad():
        w_v = torch.zeros(d, d)
        w_v[:N, :N] = torch.eye(N)
        m.kv_proj.weight[d:] = w_v
        m.out_proj.weight.copy_(torch.eye(d))
        y, _ = m(x)
    return y[0, :, :N].double()


def _cycle_defect(p: torch.Tensor) -> float:
    """max over triples of |M_ij + M_jk + M_ki| with M = log P - log P^T: zero iff P is reversible."""
    m = p.log() - p.log().T
    return (m[:, :, None] + m[None, :, :] + m.T[:, None, :]).abs().max().item()


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_symmetric_logits_make_a_reversible_attention_matrix(form):
    kv = with_form(make_mixer("kv_attention", False, n_heads=1, variant="symmetric"), form)
    p = _probe_attention(kv)
    assert torch.allclose(p.sum(-1), torch.ones(N, dtype=p.dtype), atol=1e-5)
    assert _cycle_defect(p) < 1e-4
    # Negative controls: Q/K attention, and the asymmetric variant with a non-zero table, are not reversible.
    assert _cycle_defect(_probe_attention(make_mixer("softmax", False, n_heads=1, n_kv_heads=1))) > 1e-2
    asym = with_form(make_mixer("kv_attention", False, n_heads=1), form)
    with torch.no_grad():
        asym.pos_table.normal_()
    assert _cycle_defect(_probe_attention(asym)) > 1e-2


def test_symmetric_logits_are_k_k_transposed():
    m = make_mixer("kv_attention", False, variant="symmetric")
    x = torch.randn(2, 7, 32)
    k = m.split_heads(m.kv_proj(x), 8).chunk(2, dim=1)[0]
    logits = k @ k.transpose(-1, -2)
    assert torch.equal(logits, logits.transpose(-1, -2))
    expected = m.out_proj(m.merge_heads((logits / m.head_dim**0.5).softmax(-1) @ m.split_heads(m.kv_proj(x), 8)[:, 4:]))
    assert rel_err(expected, m(x)[0]) < 1e-5


def test_no_query_weights_and_a_third_fewer_projection_parameters():
    kv, sm = make_mixer("kv_attention", False, variant="symmetric"), make_mixer("softmax", False, n_kv_heads=4)
    assert not hasattr(kv, "q_proj")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(kv) * 4 == count(sm) * 3


def test_asymmetric_variant_starts_symmetric():
    sym = make_mixer("kv_attention", True, variant="symmetric")
    asym = make_mixer("kv_attention", True, variant="asymmetric")
    x = torch.randn(2, 9, 32)
    assert torch.allclose(sym(x)[0], asym(x)[0], atol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_forms_and_decode_agree_with_a_random_positional_table(causal):
    m = make_mixer("kv_attention", causal)
    with torch.no_grad():
        m.pos_table.normal_()
    _check_fast_forms_match_reference(m, "kv_attention", causal)
    if causal:
        _check_decode(m, "kv_attention")


def test_bad_options_and_positions_are_refused():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        make_mixer("kv_attention", True, n_kv_heads=2)
    with pytest.raises(ConfigError, match="variant"):
        make_mixer("kv_attention", True, variant="diagonal")
    m = make_mixer("kv_attention", True, max_len=8)
    with pytest.raises(ShapeError, match="max_len"):
        m(torch.randn(1, 9, 32))
