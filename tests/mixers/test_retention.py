"""Multi-scale retention: the paper's parallel formula, forms with states, padding, relative positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import ConfigError
from efformer.mixers.retention import MultiScaleRetention, retention_log_decays
from efformer.nn.positional import Rope
from tests.helpers import WithPositional, make_mixer, rel_err, with_form


def _retnet(**options):
    return make_mixer("retnet", True, **{"chunk_size": 8, "sub_chunk_size": 4, **options})


def test_decay_schedule_is_the_papers():
    gammas = retention_log_decays(4).exp()
    assert torch.allclose(gammas, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256]))
    assert torch.equal(MultiScaleRetention(32, 4, causal=True).decays(), gammas)


def test_reference_equals_papers_parallel_formula():
    # (Q K^T * D) V with D[n, m] = gamma^(n - m), written with powers and no shared code.
    m = _retnet(rotate=False).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y, _ = with_form(m, "reference")(x)
    h, d, n = m.n_heads, m.head_dim, x.shape[1]
    q, k, v = (t.view(2, n, h, d).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x)))
    gamma = m.decays().double()[:, None, None]
    i = torch.arange(n, dtype=torch.float64)
    D = torch.where(i[:, None] >= i[None, :], gamma ** (i[:, None] - i[None, :]), 0.0)  # (h, n, n)
    o = ((q @ k.transpose(-1, -2)) / d**0.5 * D) @ v
    o = F.group_norm(o.transpose(1, 2).reshape(2 * n, h * d), h, m.norm_weight, m.norm_bias, 1e-5)
    y_paper = m.out_proj(F.silu(m.gate_proj(x)) * o.view(2, n, -1))
    assert rel_err(y_paper, y) < 1e-10


@pytest.mark.parametrize("n", [1, 7, 13, 67])
def test_forms_agree_with_initial_and_final_states(n):
    m = _retnet()
    x = torch.randn(2, 5 + n, 32)
    results = {}
    for form in ("reference", "chunked", "recurrent"):
        with_form(m, form)
        state = m.init_state(2, "cpu", torch.float32)
        _, state = m(x[:, :5], state=state)  # a non-zero initial state for the second call
        xs = x[:, 5:].clone().requires_grad_()
        y, state = m(xs, state=state)
        (y.square().sum() + state.s.square().sum()).backward()
        grads = [xs.grad] + [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        results[form] = (y.detach(), state.s.detach(), grads)
    y0, s0, g0 = results["reference"]
    for form in ("chunked", "recurrent"):
        y, s, g = results[form]
        assert rel_err(y0, y) < 1e-5 and rel_err(s0, s) < 1e-5, form
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(g0, g, strict=True)), form


def test_left_padding_and_shifted_positions_change_nothing():
    # Rotation is relative and a padded step has gate 1, so a left-padded row equals the row alone.
    m = with_form(_retnet(), "chunked")
    x = torch.randn(1, 10, 32)
    y_alone, _ = m(x)
    padded = torch.cat([torch.randn(1, 3, 32), x], 1)
    keep = torch.ones(1, 13, dtype=torch.bool)
    keep[0, :3] = False
    y_pad, _ = m(padded, mask=keep)
    assert rel_err(y_alone, y_pad[:, 3:]) < 1e-5
    y_shift, _ = m(x, positions=torch.arange(100, 110)[None])
    assert rel_err(y_alone, y_shift) < 1e-5


def test_left_padded_decode_matches_full_forward():
    m = _retnet()
    x = torch.randn(2, 12, 32)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, :4] = False
    y_full, _ = with_form(m, "reference")(x, mask=keep)
    with_form(m, "auto")
    state = m.init_state(2, "cpu", torch.float32)
    y_pre, state = m(x[:, :7], mask=keep[:, :7], state=state)
    s_before = state.s.clone()
    ys = [y_pre]
    for i in range(7, 12):
        y, state = m(x[:, i : i + 1], state=state)
        ys.append(y)
    assert rel_err(y_full, torch.cat(ys, 1)) < 1e-5
    assert not torch.equal(s_before, state.s)


def test_model_rotary_replaces_the_builtin_rotation():
    m = _retnet()
    x = torch.randn(2, 9, 32)
    y_builtin, _ = m(x)
    y_model, _ = WithPositional(m, Rope(32, 4, 64, True))(x)  # same base: same rotation
    assert rel_err(y_builtin, y_model) < 1e-6
    y_plain, _ = with_form(_retnet(rotate=False), "chunked")(x)
    assert rel_err(y_builtin, y_plain) > 1e-3  # the rotation does act


def test_long_sequence_stays_finite():
    m = with_form(_retnet(chunk_size=64, sub_chunk_size=16), "chunked")
    x = torch.randn(1, 2048, 32, requires_grad=True)
    y, _ = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="retnet.chunk_size"):
        MultiScaleRetention(32, 4, causal=True, options={"chunk_size": 12, "sub_chunk_size": 8})
    with pytest.raises(ConfigError, match="retnet.expand_v"):
        MultiScaleRetention(32, 4, causal=True, options={"expand_v": 0.3})
