"""GLA and simple GLA: the paper's gated recurrence, forms with states, gate limits, padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import ConfigError
from efformer.mixers.gla import GatedLinearAttention, SimpleGLA
from efformer.nn.positional import Rope
from tests.helpers import WithPositional, make_mixer, rel_err, with_form

NAMES = ["gla", "simple_gla"]


def _mixer(name, **options):
    return make_mixer(name, True, **{"chunk_size": 8, "sub_chunk_size": 4, **options})


def _heads(m, t):
    b, n, _ = t.shape
    return t.view(b, n, m.n_heads, -1).transpose(1, 2)


def _finish(m, x, o):
    """Group norm per head, swish gate, output projection: written out for the test."""
    b, n = x.shape[:2]
    o = F.group_norm(o.transpose(1, 2).reshape(b * n, -1), m.n_heads, m.norm_weight, m.norm_bias, 1e-5)
    return m.out_proj(F.silu(m.gate_proj(x)) * o.view(b, n, -1))


def _alpha(m, x):
    """The paper's gate alpha_t = sigmoid(logits)^(1/tau), (b, h, n, key_dim | 1), without logs."""
    tau = m.opts.gate_logit_normalizer
    if isinstance(m, GatedLinearAttention):
        return _heads(m, torch.sigmoid(m.gate_up(m.gate_down(x))) ** (1 / tau))
    return (torch.sigmoid(m.gate(x)) ** (1 / tau)).transpose(1, 2)[..., None]


@pytest.mark.parametrize("name", NAMES)
def test_reference_equals_the_gated_recurrence_of_the_paper(name):
    m = _mixer(name).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, _ = with_form(m, "reference")(x)
    q = _heads(m, m.q_proj(x)) * m.key_dim**-0.5
    k, v, a = _heads(m, m.k_proj(x)), _heads(m, m.v_proj(x)), _alpha(m, x)
    s = torch.zeros(2, m.n_heads, m.key_dim, m.value_dim, dtype=torch.float64)
    out = []
    for t in range(x.shape[1]):
        s = a[:, :, t, :, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    assert rel_err(_finish(m, x, torch.stack(out, 2)), y) < 1e-10


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 13, 67])
def test_forms_agree_with_initial_and_final_states(name, n):
    m = _mixer(name)
    x = torch.randn(2, 5 + n, 32)
    results = {}
    for form in ("reference", "chunked", "recurrent"):
        with_form(m, form)
        state = m.init_state(2, "cpu", torch.float32)
        _, state = m(x[:, :5], state=state)
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


@pytest.mark.parametrize("name", NAMES)
def test_gate_limits_no_decay_and_full_forgetting(name):
    m = _mixer(name, chunk_size=64, sub_chunk_size=16)
    bias = m.gate_up.bias if name == "gla" else m.gate.bias
    x = torch.randn(2, 150, 32)
    q = _heads(m, m.q_proj(x)) * m.key_dim**-0.5
    k, v = _heads(m, m.k_proj(x)), _heads(m, m.v_proj(x))
    with torch.no_grad():
        bias.fill_(1e4)  # alpha = 1: plain causal linear attention
        o_open = torch.einsum("bhtk,bhtkv->bhtv", q, torch.einsum("bhtk,bhtv->bhtkv", k, v).cumsum(2))
        bias.fill_(-1e4)  # alpha ~ exp(-625): each step forgets everything before it
        o_shut = (q * k).sum(-1, keepdim=True) * v
        for form in ("reference", "chunked"):
            with_form(m, form)
            bias.fill_(1e4)
            assert rel_err(_finish(m, x, o_open), m(x)[0]) < 1e-5, form
            bias.fill_(-1e4)
            y = m(x)[0]
            assert torch.isfinite(y).all() and rel_err(_finish(m, x, o_shut), y) < 1e-5, form


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_row_equals_the_row_alone_in_decode(name):
    m = _mixer(name)
    x = torch.randn(1, 10, 32)
    y_alone, _ = with_form(m, "reference")(x)
    padded = torch.cat([torch.randn(1, 3, 32) * 5, x], 1)
    keep = torch.ones(1, 13, dtype=torch.bool)
    keep[0, :3] = False
    with_form(m, "auto")
    state = m.init_state(1, "cpu", torch.float32)
    y_pre, state = m(padded[:, :6], mask=keep[:, :6], state=state)
    ys = [y_pre[:, 3:]] + [m(padded[:, i : i + 1], state=state)[0] for i in range(6, 13)]
    assert rel_err(y_alone, torch.cat(ys, 1)) < 1e-5


def test_simple_gla_takes_a_model_rotary_and_stays_relative():
    m = with_form(_mixer("simple_gla"), "chunked")
    x = torch.randn(2, 9, 32)
    y_plain, _ = m(x)
    m = WithPositional(m, Rope(32, 4, 64, True))
    y0, _ = m(x)
    y1, _ = m(x, positions=torch.arange(50, 59).expand(2, 9))
    assert rel_err(y0, y1) < 1e-5 and rel_err(y_plain, y0) > 1e-3


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="gla.expand_k"):
        GatedLinearAttention(32, 4, causal=True, options={"expand_k": 0.3})
    with pytest.raises(ConfigError, match="simple_gla.chunk_size"):
        SimpleGLA(32, 4, causal=True, options={"chunk_size": 10, "sub_chunk_size": 4})


@pytest.mark.parametrize("n", [1, 7])
def test_gated_group_norm_backward_is_autograds(n):
    """The lean gated norm (inputs kept, the rest rebuilt in backward): gradcheck in float64, and
    equal to the plain autograd version on values."""
    from efformer.mixers.gla import GatedGroupNorm

    torch.manual_seed(0)
    m = SimpleGLA(12, 3, causal=True, options={"chunk_size": 4, "sub_chunk_size": 2}).double()
    with torch.no_grad():
        m.norm_weight.normal_()
        m.norm_bias.normal_()
    x = torch.randn(2, n, 12, dtype=torch.double, requires_grad=True)
    o = torch.randn(2, 3, n, 4, dtype=torch.double, requires_grad=True)
    args = (x, m.gate_proj.weight, o, m.norm_weight, m.norm_bias)
    assert rel_err(m._gated_norm(x, o), GatedGroupNorm.apply(*args, 1e-5)) < 1e-12
    assert torch.autograd.gradcheck(lambda *a: GatedGroupNorm.apply(*a, 1e-5), args)
