"""Positional schemes: every registered scheme is exercised; each checked against its definition."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError, ShapeError
from efformer.nn.positional import build_positional
from efformer.registry import POSITIONALS

D, H = 32, 4


def _pos(n, b=2, offset=0):
    return torch.arange(offset, offset + n).expand(b, n)


@pytest.mark.parametrize("name", POSITIONALS.names())
@pytest.mark.parametrize("causal", [True, False])
def test_every_scheme_builds_and_is_relative_or_absolute(name, causal):
    pos = build_positional(name, D, H, 128, causal)
    assert pos.kind in ("none", "embedding", "rotary", "bias")
    if pos.kind == "embedding":
        e = pos.embed(_pos(7))
        assert e.shape == (2, 7, D) and not torch.allclose(e[:, 0], e[:, 1])
    elif pos.kind == "rotary":
        # the score q.k depends only on the distance: shifting both positions leaves it unchanged
        q, k = torch.randn(1, H, 1, D // H), torch.randn(1, H, 1, D // H)
        s1 = (pos.rotate_queries(q, _pos(1, 1, 5)) * pos.rotate_keys(k, _pos(1, 1, 2))).sum()
        s2 = (pos.rotate_queries(q, _pos(1, 1, 25)) * pos.rotate_keys(k, _pos(1, 1, 22))).sum()
        assert torch.allclose(s1, s2, atol=1e-4)
    elif pos.kind == "bias":
        b1 = pos(_pos(5, 1, 0), _pos(5, 1, 0))
        b2 = pos(_pos(5, 1, 3), _pos(5, 1, 3))
        assert b1.shape == (1, H, 5, 5)
        if name != "fire":  # FIRE normalises by the query position, so it is not shift-invariant
            assert torch.allclose(b1, b2)


def test_sinusoidal_matches_formula():
    e = build_positional("sinusoidal", D, H, 64, False).embed(_pos(4, 1))
    i, p = 3, 2
    assert math.isclose(e[0, p, i].item(), math.sin(p * 10000 ** (-i / (D // 2))), rel_tol=1e-5)
    assert math.isclose(e[0, p, D // 2 + i].item(), math.cos(p * 10000 ** (-i / (D // 2))), rel_tol=1e-5)


def test_learned_refuses_positions_past_max_len():
    pos = build_positional("learned", D, H, 8, True)
    with pytest.raises(ShapeError, match="max_len=8"):
        pos.embed(_pos(9))


def test_rope_preserves_norm_and_partial_rotary_keeps_the_rest():
    pos = build_positional("rope", D, H, 64, True, {"rotary_fraction": 0.5})
    q = torch.randn(2, H, 6, D // H)
    r = pos.rotate_queries(q, _pos(6))
    assert torch.allclose(r.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.equal(r[..., pos.rot_dim :], q[..., pos.rot_dim :])
    assert torch.allclose(r[:, :, 0], q[:, :, 0])  # position 0 is the identity rotation


def test_xpos_scores_decay_with_distance():
    """The q.k scale of xPos is zeta^((n - m) / scale_base): 1 at distance 0, falling with distance."""
    pos = build_positional("xpos", D, H, 64, True, {"scale_base": 8})

    def scale(n, m):
        rq, rk = pos.rotation(_pos(1, 1, n), torch.float64), pos.rotation(_pos(1, 1, m), torch.float64)
        return ((rq.q_cos**2 + rq.q_sin**2).sqrt() * (rk.k_cos**2 + rk.k_sin**2).sqrt()).flatten()

    assert torch.allclose(scale(0, 0), torch.ones(pos.rot_dim // 2, dtype=torch.float64))
    assert torch.allclose(scale(8, 0), pos.zeta.double())  # exactly zeta^1 at distance scale_base
    assert torch.allclose(scale(30, 22), scale(8, 0))  # depends on the distance only
    assert bool((scale(16, 0) < scale(8, 0)).all())


def test_alibi_values_and_slopes():
    pos = build_positional("alibi", D, 8, 64, True)
    assert torch.allclose(pos.slopes, torch.tensor([2 ** (-i) for i in range(1, 9)]))
    b = pos(_pos(4, 1), _pos(4, 1))
    assert b[0, 0, 3, 1].item() == pytest.approx(-0.5 * 2)
    six = build_positional("alibi", D, 6, 64, True).slopes  # not a power of two: 4 base slopes + 2 between
    assert torch.allclose(six[:4], torch.tensor([2 ** (-2 * i) for i in range(1, 5)]))


@pytest.mark.parametrize("causal", [True, False])
def test_t5_buckets_are_monotone_in_distance(causal):
    pos = build_positional("t5", D, H, 512, causal)
    rel = -torch.arange(0, 300)
    b = pos.bucket(rel)
    assert (b[1:] >= b[:-1]).all() and b.max() < pos.opts.num_buckets
    assert torch.equal(b[:8], torch.arange(8))  # small distances get their own bucket
    if not causal:
        assert (pos.bucket(-rel[1:]) >= pos.opts.num_buckets // 2).all()  # future keys use the other half


def test_fire_bias_depends_on_relative_distance_scaled_by_query_position():
    pos = build_positional("fire", D, H, 64, True, {"init_threshold": 1.0})
    for p in pos.mlp.parameters():
        torch.nn.init.normal_(p)
    b = pos(torch.tensor([[10, 20]]), torch.tensor([[5, 10]]))
    # distance 5 from query 10 and distance 10 from query 20: psi ratios differ, so biases differ
    assert not torch.allclose(b[0, :, 0, 0], b[0, :, 1, 1])
    # same query, same key: the bias is f(0) for every query position
    same = pos(torch.tensor([[3, 40]]), torch.tensor([[3, 40]]))
    assert torch.allclose(same[0, :, 0, 0], same[0, :, 1, 1])


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match=r"positional_options\[rope\].base"):
        build_positional("rope", D, H, 64, True, {"base": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        build_positional("alibi", D, H, 64, True, {"slope": 1})


def test_rope_half_layout_is_interleaved_on_permuted_dims():
    inter = build_positional("rope", D, H, 128, True)
    half = build_positional("rope", D, H, 128, True, {"layout": "half"})
    hd = D // H
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # interleaved dim -> its half-layout slot
    q, p = torch.randn(2, H, 5, hd), _pos(5, offset=7)
    assert torch.allclose(half.rotate_queries(q[..., perm], p), inter.rotate_queries(q, p)[..., perm], atol=1e-6)


def test_rope_linear_scaling_is_position_interpolation():
    plain = build_positional("rope", D, H, 128, True)
    linear = build_positional("rope", D, H, 128, True, {"scaling": "linear", "factor": 4.0})
    q = torch.randn(1, H, 3, D // H)
    far = torch.tensor([[40, 44, 48]])
    assert torch.allclose(linear.rotate_queries(q, far), plain.rotate_queries(q, far // 4), atol=1e-5)


@pytest.mark.parametrize("scaling, opts", [
    ("linear", {"factor": 4.0}),
    ("llama3", {"factor": 8.0, "original_max_len": 32}),
    ("yarn", {"factor": 4.0, "original_max_len": 32}),
])
def test_rope_scalings_only_slow_frequencies_down(scaling, opts):
    plain = build_positional("rope", D, H, 128, True).inv_freq
    scaled = build_positional("rope", D, H, 128, True, {"scaling": scaling, **opts}).inv_freq
    factor = opts["factor"]
    assert torch.all(scaled <= plain * (1 + 1e-6)) and torch.all(scaled >= plain / factor * (1 - 1e-6))
    assert torch.allclose(scaled[-1], plain[-1] / factor)  # the slowest frequency is interpolated by every scaling
    if scaling != "linear":
        assert torch.equal(scaled[0], plain[0])  # the fastest one is kept


def test_rope_dynamic_grows_the_base_only_past_original_len():
    dyn = build_positional("rope", D, H, 16, True, {"scaling": "dynamic", "factor": 2.0})
    plain = build_positional("rope", D, H, 16, True)
    q = torch.randn(1, H, 4, D // H)
    short, long = _pos(4, 1, 10), _pos(4, 1, 60)
    assert torch.equal(dyn.rotate_queries(q, short), plain.rotate_queries(q, short))
    assert not torch.allclose(dyn.rotate_queries(q, long), plain.rotate_queries(q, long), atol=1e-3)


def test_rope_yarn_scales_cos_and_sin():
    yarn = build_positional("rope", D, H, 128, True, {"scaling": "yarn", "factor": 4.0, "original_max_len": 32})
    q = torch.randn(1, H, 1, D // H)
    assert torch.allclose(yarn.rotate_queries(q, _pos(1, 1, 0)), q * (0.1 * math.log(4.0) + 1))  # angle 0


def test_rope_llama3_bands_must_be_ordered():
    with pytest.raises(ConfigError, match="high_freq_factor"):
        build_positional("rope", D, H, 128, True, {"scaling": "llama3", "low_freq_factor": 4.0,
                                                    "high_freq_factor": 2.0})


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("name", ["rope", "xpos"])
def test_rotation_equals_the_pairwise_formula_bit_for_bit(layout, fraction, name):
    """The swap-and-signed-sin rotation (tables shared by every layer) is the textbook pair formula exactly,
    on queries and keys, including partial rotary and xPos's different q/k scales."""
    scheme = build_positional(name, 24, 2, 64, True, {"layout": layout, "rotary_fraction": fraction})
    pos = torch.tensor([[0, 3, 7, 50, 11], [2, 2, 9, 63, 1]])
    rot = scheme.context(pos, torch.float32).rotation
    x = torch.randn(2, 3, 5, 12, generator=torch.Generator().manual_seed(0))
    r = rot.rot_dim

    def formula(x, cos, sin):
        if layout == "half":
            x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        else:
            x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
            out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
        return torch.cat([out, x[..., r:]], -1)

    assert torch.equal(rot.queries(x), formula(x, rot.q_cos, rot.q_sin))
    assert torch.equal(rot.keys(x), formula(x, rot.k_cos, rot.k_sin))
    assert torch.equal(rot.queries(x.double()), formula(x.double(), rot.q_cos.double(), rot.q_sin.double()))
