"""Kernel attention (linear, performer, cosformer): definitions, forms with state, approximation, redraw."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.kernel import orthogonal_features
from efformer.mixers.softmax import SoftmaxAttention
from efformer.registry import MIXERS
from tests.helpers import WithPositional, make_mixer, rel_err, with_form

KERNELS = ("linear", "performer", "cosformer")


def softmax_twin(m) -> SoftmaxAttention:
    """Exact softmax attention with the same q/kv/out weights as ``m``."""
    sm = SoftmaxAttention(m.d_model, m.n_heads, causal=m.causal).eval()
    sm.load_state_dict(
        {k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("q_proj", "kv_proj", "out_proj")}
    )
    return sm


def qkv(m, x):
    """The mixer's own q, k, v (b, h, n, d), computed here from its weights."""
    q = m.split_heads(x @ m.q_proj.weight.T)
    k, v = m.split_heads(x @ m.kv_proj.weight.T, 2 * m.n_heads).chunk(2, dim=1)
    return q, k, v


def explicit(m, x, a):
    """Normalised attention with the explicit weights a (b, h, n, n), causal if ``m`` is, through out_proj."""
    if m.causal:
        a = a.tril()
    _, _, v = qkv(m, x)
    o = (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-6)  # a relu row may be all zero
    return m.merge_heads(o) @ m.out_proj.weight.T


@pytest.mark.parametrize("causal", [True, False])
def test_linear_matches_its_definition(causal):
    m = make_mixer("linear", causal)
    x = torch.randn(2, 9, 32)
    q, k, _ = qkv(m, x)
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    for form in ("reference", "chunked", "recurrent"):
        assert rel_err(explicit(m, x, a), with_form(m, form)(x)[0]) < 1e-5, form


@pytest.mark.parametrize("causal", [True, False])
def test_cosformer_reweighting_matches_explicit_definition(causal):
    m = make_mixer("cosformer", causal, max_len=40)
    x = torch.randn(2, 11, 32)
    q, k, _ = qkv(m, x)
    i = torch.arange(11.0)
    a = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / 40)
    want = explicit(m, x, a)
    for form in ("reference", "chunked", "recurrent"):
        assert rel_err(want, with_form(m, form)(x)[0]) < 1e-5, form
    # The re-weighting matters: without it the output is a different function.
    assert rel_err(want, explicit(m, x, F.relu(q) @ F.relu(k).transpose(-1, -2))) > 1e-3


def test_cosformer_refuses_positions_beyond_max_len():
    m = make_mixer("cosformer", True, max_len=8)
    m(torch.randn(1, 8, 32))
    with pytest.raises(ShapeError, match="max_len=8"):
        m(torch.randn(1, 9, 32))
    state = m.init_state(1, "cpu", torch.float32)
    _, state = m(torch.randn(1, 8, 32), state=state)
    with pytest.raises(ShapeError, match="max_len"):
        m(torch.randn(1, 1, 32), state=state)  # decoding the 9th token


@pytest.mark.parametrize("name", KERNELS)
def test_every_form_carries_state_like_the_full_reference(name):
    """recurrent == chunked == reference on a left-padded batch, each form fed in pieces through its state."""
    m = make_mixer(name, True)
    n = 23
    x = torch.randn(2, n, 32)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :5] = False  # left padding, as a causal LM batch has
    y_full, _ = with_form(m, "reference")(x, mask=keep)
    for form in ("reference", "chunked", "recurrent"):
        with_form(m, form)
        state, ys, i = m.init_state(2, "cpu", torch.float32), [], 0
        for c in (3, 1, 9, 10):  # pieces that straddle the pad boundary and chunk edges
            y, state = m(x[:, i : i + c], mask=keep[:, i : i + c], state=state)
            ys.append(y)
            i += c
        assert rel_err(y_full, torch.cat(ys, 1)) < 1e-5, form


@pytest.mark.parametrize("name", KERNELS)
def test_a_padded_step_leaves_the_state_unchanged(name):
    m = make_mixer(name, True)
    state = m.init_state(2, "cpu", torch.float32)
    _, state = m(torch.randn(2, 5, 32), state=state)
    before = {k: v.clone() for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
    for form in ("reference", "chunked", "recurrent"):
        _, state = with_form(m, form)(torch.randn(2, 1, 32) * 10, mask=torch.zeros(2, 1, dtype=torch.bool), state=state)
    for key, value in before.items():
        assert torch.equal(getattr(state, key), value), key


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_vs_softmax_falls_as_features_grow(causal):
    errs = {}
    for n_features in (16, 64, 256):
        e = []
        for seed in range(4):
            m = make_mixer("performer", causal, n_features=n_features)  # same weights for every seed
            torch.manual_seed(seed)
            m.redraw_features()
            x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                e.append(rel_err(softmax_twin(m)(x)[0], m(x)[0]))
        errs[n_features] = sum(e) / len(e)
    assert errs[16] > errs[64] > errs[256], errs
    assert errs[256] < 0.75 * errs[16], errs


def test_performer_features_are_orthogonal_blocks_of_gaussian_length():
    torch.manual_seed(0)
    w = orthogonal_features(20, 8)  # blocks of 8, 8, 4 rows
    unit = w / w.norm(dim=1, keepdim=True)
    for block in (unit[:8], unit[8:16], unit[16:]):
        gram = block @ block.T
        assert torch.allclose(gram, torch.eye(len(block)), atol=1e-5)
    assert not torch.allclose(unit[:8] @ unit[8:16].T, torch.zeros(8, 8), atol=1e-2)  # blocks independent
    lengths = orthogonal_features(4096, 8).norm(dim=1)
    assert abs(lengths.square().mean().item() - 8) < 0.5  # chi(8) lengths: E|w|^2 = d


def test_performer_redraw_is_explicit_and_optional():
    m = make_mixer("performer", False, redraw_every=2)
    x = torch.randn(1, 6, 32)
    w0 = m.projection.clone()
    m(x)
    m(x)  # eval mode never redraws
    assert torch.equal(m.projection, w0)
    m.train()
    m(x)
    m(x)
    assert torch.equal(m.projection, w0)  # calls 1 and 2 use the first draw
    m(x)
    w1 = m.projection.clone()
    assert not torch.equal(w1, w0)  # call 3 redraws
    y1, _ = m.eval()(x)
    m.redraw_features()
    assert not torch.equal(m.projection, w1) and not torch.allclose(m(x)[0], y1)
    never = make_mixer("performer", False).train()
    w = never.projection.clone()
    for _ in range(3):
        never(x)
    assert torch.equal(never.projection, w)


def test_performer_draw_follows_the_global_seed_and_is_saved():
    cls = MIXERS.get("performer")
    torch.manual_seed(5)
    a = cls(32, 4, causal=True, options={"n_features": 16})
    torch.manual_seed(5)
    b = cls(32, 4, causal=True, options={"n_features": 16})
    assert torch.equal(a.projection, b.projection)
    assert "projection" in a.state_dict()


def test_performer_is_stable_for_large_inputs():
    m = make_mixer("performer", True)
    x = torch.randn(2, 13, 32) * 200  # log-features in the hundreds would overflow exp unstabilised
    for form in ("reference", "chunked", "recurrent"):
        y, _ = with_form(m, form)(x)
        assert torch.isfinite(y).all(), form


def test_kernel_options_are_validated():
    with pytest.raises(ConfigError, match="performer.n_features"):
        make_mixer("performer", True, n_features=0)
    with pytest.raises(ConfigError, match="linear.chunk"):
        make_mixer("linear", True, chunk=0)
    with pytest.raises(ConfigError, match="max_len"):
        make_mixer("cosformer", True, max_len=0)


@pytest.mark.parametrize("causal", [True, False])
def test_performer_with_rope_forms_agree_and_approach_rope_softmax(causal):
    from efformer.mixers.kernel import Performer
    from efformer.mixers.softmax import SoftmaxAttention
    from efformer.nn.positional import build_positional
    from tests.helpers import rel_err, with_form

    rope = build_positional("rope", 32, 4, 256, causal)
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    m = WithPositional(Performer(32, 4, causal=causal, options={"chunk": 4, "n_features": 64}).eval(), rope)
    y_ref, _ = with_form(m, "reference")(x)
    for form in ("chunked", "recurrent"):
        assert rel_err(y_ref, with_form(m, form)(x)[0]) < 1e-5
    if causal:  # token-by-token decode with absolute positions == the full forward
        st = m.init_state(2, "cpu", torch.float32)
        ys = [with_form(m, "auto")(x[:, i : i + 1], state=st)[0] for i in range(13)]
        assert rel_err(y_ref, torch.cat(ys, 1)) < 1e-5
    # the estimate approaches RoPE softmax attention with the same weights as features grow
    soft = WithPositional(SoftmaxAttention(32, 4, causal=causal).eval(), rope)
    errs = []
    for n_features in (16, 256, 2048):
        torch.manual_seed(1)
        p = WithPositional(Performer(32, 4, causal=causal, options={"n_features": n_features}).eval(), rope)
        p.q_proj.load_state_dict(soft.q_proj.state_dict())
        p.kv_proj.load_state_dict(soft.kv_proj.state_dict())
        p.out_proj.load_state_dict(soft.out_proj.state_dict())
        errs.append(rel_err(soft(x)[0], p(x)[0]))
    assert errs[0] > errs[1] > errs[2], errs
