"""DeltaNet / Gated DeltaNet: chunked == reference == recurrent (outputs, states, gradients), the
delta-rule memory property, gated with alpha = 1 == plain, long-sequence stability, decode from a
given state, and left padding == no padding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from efformer.mixers.deltanet import (
    DeltaLayerRecompute,
    DeltaNet,
    GatedDeltaNet,
    HeadNormGate,
    delta_rule_chunked,
    delta_rule_recompute,
    delta_rule_recurrent,
    delta_rule_reference,
)
from tests.helpers import make_mixer, rel_err, with_form

D, H = 32, 4
NAMES = ("deltanet", "gated_deltanet")
FORMS = ("reference", "chunked", "recurrent")


def _inputs(t: int, gated: bool, seed: int = 0, b: int = 2, h: int = 2, dk: int = 8, dv: int = 6):
    """Unit-norm q, k; v; beta in (0, 1); log alpha in (-0.5, 0] (or None); a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1)
    v = torch.randn(b, h, t, dv, generator=gen)
    beta = torch.rand(b, h, t, generator=gen)
    log_alpha = -0.5 * torch.rand(b, h, t, generator=gen) if gated else None
    s0 = torch.randn(b, h, dk, dv, generator=gen)
    return q, k, v, beta, log_alpha, s0


def _outputs_and_grads(fn, inputs, **kw):
    """[o, final state, d/d each input] for loss = <o, g_o> + <S, g_S> with fixed cotangents."""
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    o, s = fn(*leaves, **kw)
    gen = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()
    loss.backward()
    return [o.detach(), s.detach()] + [x.grad for x in leaves if x is not None]


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("chunk", [8, 1])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_chunked_and_recurrent_equal_reference_with_states_and_grads(gated, chunk, t):
    inputs = _inputs(t, gated, seed=t)
    ref = _outputs_and_grads(delta_rule_reference, inputs)
    names = ["output", "final state", "dq", "dk", "dv", "dbeta", "dlog_alpha", "dS0"]
    if not gated:
        names.remove("dlog_alpha")
    for label, got in (
        ("chunked", _outputs_and_grads(delta_rule_chunked, inputs, chunk_size=chunk)),
        ("recompute", _outputs_and_grads(delta_rule_recompute, inputs, chunk_size=chunk, chunks_per_group=3)),
        ("recurrent", _outputs_and_grads(delta_rule_recurrent, inputs)),
    ):
        for name, a, b in zip(names, ref, got, strict=True):
            assert a.abs().max() > 0, f"{name} is identically zero: the comparison would be vacuous"
            assert rel_err(a, b) <= 1e-5, f"{label} {name} differs at t={t}, chunk={chunk}"


def test_zero_initial_state_is_the_default():
    q, k, v, beta, log_alpha, s0 = _inputs(13, True)
    for fn in (delta_rule_reference, delta_rule_recurrent, delta_rule_chunked):
        o1, s1 = fn(q, k, v, beta, log_alpha)
        o2, s2 = fn(q, k, v, beta, log_alpha, torch.zeros_like(s0))
        assert torch.equal(o1, o2) and torch.equal(s1, s2)


@pytest.mark.parametrize("form", FORMS)
def test_delta_rule_memory_stores_reads_and_overwrites(form):
    # beta = 1 with orthonormal keys: each write replaces the value at its key exactly; an additive
    # (linear-attention) memory would return v_old + v_new after the overwrite instead.
    dk = dv = 8
    gen = torch.Generator().manual_seed(0)
    keys = torch.linalg.qr(torch.randn(dk, dk, dtype=torch.float64, generator=gen))[0].T.float()
    vals = torch.randn(dk + 1, dv, generator=gen)
    write_k = torch.cat([keys, keys[2:3]])  # write every key, then overwrite key 2 with vals[8]
    n_w = dk + 1
    k = torch.cat([write_k, torch.zeros(dk, dk)])  # then dk read-only steps (beta = 0)
    q = torch.cat([write_k, keys])  # each write step reads back its own key
    v = torch.cat([vals, torch.zeros(dk, dv)])
    beta = torch.cat([torch.ones(n_w), torch.zeros(dk)])
    kw = {"chunk_size": 3} if form == "chunked" else {}
    fn = {"reference": delta_rule_reference, "chunked": delta_rule_chunked, "recurrent": delta_rule_recurrent}[form]
    o, _ = fn(q[None, None], k[None, None], v[None, None], beta[None, None], **kw)
    o = o[0, 0]
    torch.testing.assert_close(o[:n_w], vals, atol=1e-5, rtol=0)  # write v at k, read k: get v
    expected = vals[:dk].clone()
    expected[2] = vals[dk]  # the overwrite replaced the value at key 2 and left the others alone
    torch.testing.assert_close(o[n_w:], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_gated_with_alpha_one_equals_deltanet(form):
    opts = {"chunk_size": 4, "conv_size": 3}
    torch.manual_seed(0)
    plain = DeltaNet(D, H, causal=True, options={**opts, "output_gate": True}).eval()
    gated = GatedDeltaNet(D, H, causal=True, options=opts).eval()
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["A_log", "alpha_proj.weight", "dt_bias"]
    x = torch.randn(2, 13, D)
    y_plain, _ = with_form(plain, form)(x)
    y_decayed, _ = with_form(gated, form)(x)
    assert rel_err(y_plain, y_decayed) > 1e-3, "the default decay should change the output"
    with torch.no_grad():
        gated.alpha_proj.weight.zero_()
        gated.dt_bias.fill_(-200.0)  # softplus(-200) == 0 in fp32, so log alpha == 0 and alpha == 1
    y_gated, _ = gated(x)
    assert rel_err(y_plain, y_gated) < 1e-6


def test_long_sequence_with_strong_decay_is_stable():
    # Cumulative log decay reaches -5 * 64 inside a chunk: exp(-G) would overflow, exp(G_t - G_i) does not.
    q, k, v, beta, _, s0 = _inputs(1024, True, b=1, h=2)
    log_alpha = torch.full_like(beta, -5.0)
    log_alpha[..., 500:600] = 0.0  # and a stretch with no decay at all
    o_c, s_c = delta_rule_chunked(q, k, v, beta, log_alpha, s0, chunk_size=64)
    o_r, s_r = delta_rule_recurrent(q, k, v, beta, log_alpha, s0)
    assert torch.isfinite(o_c).all() and torch.isfinite(s_c).all()
    assert rel_err(o_r, o_c) < 1e-5 and rel_err(s_r, s_c) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_long_sequence_layer_is_stable(name):
    m = make_mixer(name, True, chunk_size=64)
    x = torch.randn(1, 1024, D) * 3
    y_c, st_c = with_form(m, "chunked")(x, state=m.init_state(1, "cpu", torch.float32))
    y_r, st_r = with_form(m, "recurrent")(x, state=m.init_state(1, "cpu", torch.float32))
    assert torch.isfinite(y_c).all() and torch.isfinite(st_c.S).all()
    # Unit keys and beta in (0, 1) keep the memory bounded: its norm stays within a few value norms.
    v_norm = m.qkv_proj(x).chunk(3, -1)[2].norm(dim=-1).max()
    assert st_c.S.norm(dim=(-2, -1)).max() < 10 * v_norm
    assert rel_err(y_r, y_c) < 1e-5 and rel_err(st_r.S, st_c.S) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_decode_from_a_given_state_equals_chunked_prefill(name):
    m = make_mixer(name, True)
    state = m.init_state(2, "cpu", torch.float32)
    state.S = torch.randn_like(state.S)
    state.conv = torch.randn_like(state.conv)
    x = torch.randn(2, 11, D)
    y_chunked, st_chunked = with_form(m, "chunked")(x, state=copy.deepcopy(state))
    y_ref, st_ref = with_form(m, "reference")(x, state=copy.deepcopy(state))
    with_form(m, "auto")
    st, ys = copy.deepcopy(state), []
    for i in range(x.shape[1]):
        assert m.resolve_form(x[:, i : i + 1], st) == "recurrent"
        y, st = m(x[:, i : i + 1], state=st)
        ys.append(y)
    y_dec = torch.cat(ys, 1)
    assert rel_err(y_dec, y_chunked) < 1e-5 and rel_err(y_ref, y_chunked) < 1e-5
    assert rel_err(st.S, st_chunked.S) < 1e-5 and rel_err(st_ref.S, st_chunked.S) < 1e-5
    last_inputs = m.qkv_proj(x[:, -2:]).transpose(1, 2)  # conv_size 3 keeps the last 2 projected inputs
    assert torch.allclose(st.conv, last_inputs, atol=1e-6) and torch.allclose(st_chunked.conv, last_inputs, atol=1e-6)
    assert st.seen == st_chunked.seen == 11
    y_cold, _ = with_form(m, "chunked")(x)
    assert rel_err(y_cold, y_chunked) > 1e-3, "the initial state should matter"


@pytest.mark.parametrize("name", NAMES)
def test_without_conv_forms_agree_and_decode_matches(name):
    m = make_mixer(name, True, conv_size=0)
    assert not hasattr(m, "conv") and m.init_state(1, "cpu", torch.float32).conv is None
    x = torch.randn(2, 11, D)
    y_ref, _ = with_form(m, "reference")(x)
    y_chunked, _ = with_form(m, "chunked")(x)
    assert rel_err(y_ref, y_chunked) < 1e-5
    with_form(m, "auto")
    state, ys = m.init_state(2, "cpu", torch.float32), []
    for i, c in ((0, 4), (4, 1), (5, 6)):
        y, state = m(x[:, i : i + c], state=state)
        ys.append(y)
    assert rel_err(y_ref, torch.cat(ys, 1)) < 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", FORMS)
def test_left_padding_equals_no_padding(name, form):
    m = with_form(make_mixer(name, True), form)
    x = torch.randn(1, 9, D)
    pad = 5
    x_pad = torch.cat([torch.randn(1, pad, D) * 5, x], 1)
    mask = torch.arange(pad + 9)[None] >= pad
    y, st = m(x, state=m.init_state(1, "cpu", torch.float32))
    y_pad, st_pad = m(x_pad, mask=mask, state=m.init_state(1, "cpu", torch.float32))
    assert (y_pad[:, :pad] == 0).all()
    assert rel_err(y, y_pad[:, pad:]) < 1e-6
    assert rel_err(st.S, st_pad.S) < 1e-6 and torch.allclose(st.conv, st_pad.conv)


@pytest.mark.parametrize("name", NAMES)
def test_a_padded_decode_step_leaves_the_memory_unchanged(name):
    m = make_mixer(name, True)
    state = m.init_state(2, "cpu", torch.float32)
    _, state = m(torch.randn(2, 6, D), state=state)
    before = state.S.clone()
    _, state = m(torch.randn(2, 1, D) * 5, mask=torch.tensor([[False], [True]]), state=state)
    assert torch.equal(state.S[0], before[0])
    assert not torch.allclose(state.S[1], before[1])


def test_bad_options_name_the_field():
    from efformer.errors import ConfigError

    with pytest.raises(ConfigError, match="deltanet.chunk_size"):
        DeltaNet(D, H, causal=True, options={"chunk_size": 0})
    with pytest.raises(ConfigError, match="gated_deltanet.conv_size"):
        GatedDeltaNet(D, H, causal=True, options={"conv_size": -1})


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("t", [1, 7, 13, 30])
def test_recompute_matches_autograd_of_the_chunked_form(gated, t):
    """The hand-written backward equals autograd's on the chunked form, with groups that split the chunks."""
    inputs = _inputs(t, gated)
    for chunk, group in ((4, 1), (4, 3), (8, 16)):
        ref = _outputs_and_grads(delta_rule_chunked, inputs, chunk_size=chunk)
        got = _outputs_and_grads(delta_rule_recompute, inputs, chunk_size=chunk, chunks_per_group=group)
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            if a is not None:
                assert rel_err(a, b) < 1e-5, (chunk, group, i)


@pytest.mark.parametrize("gated", [False, True])
def test_recompute_gradcheck(gated):
    """gradcheck of the recomputing Function in float64 on a tiny shape (two groups, a padded chunk)."""
    q, k, v, beta, log_alpha, s0 = (x.double() if x is not None else None for x in _inputs(7, gated, b=1, h=1, dk=3))
    ins = [x.requires_grad_() for x in (q, k, v, beta, s0)] + ([log_alpha.requires_grad_()] if gated else [])

    def fn(q, k, v, beta, s0, *la):
        return delta_rule_recompute(q, k, v, beta, la[0] if la else None, s0, chunk_size=4, chunks_per_group=1)

    assert torch.autograd.gradcheck(fn, ins)


def _layer_case(name: str, t: int, kind: str, conv: int = 3):
    """A layer with its test options, input x (2, t, D), and a padding mask or packed segment ids (or neither)."""
    m = make_mixer(name, True, conv_size=conv)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, D, generator=gen)
    mask = segments = None
    if kind == "padded":  # row 1 left-padded by up to 3 steps
        mask = torch.arange(t)[None] >= torch.tensor([[0], [min(3, t - 1)]])
    if kind == "packed":  # two segments per row, split at different places
        segments = (torch.arange(t)[None] >= torch.tensor([[t // 2], [t // 3]])).long()
    return m, x, mask, segments


def _layer_grads(m, x, run):
    """[y or o, dx, d every parameter] of loss = <run(x), fixed cotangent>."""
    m.zero_grad()
    xs = x.clone().requires_grad_(True)
    y = run(xs)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [y.detach(), xs.grad] + [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in m.parameters()]


def _assert_same(ref, got, what):
    # Max abs error within 1e-5 of max(|ref|, 1), not a relative error: at t = 1 beta's gradient is ~0
    # in exact arithmetic (the per-head RMS norm removes the scale a single write puts on o), so its
    # relative error would be fp32 noise over noise.
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        err, scale = (b - a).abs().max().item(), max(a.abs().max().item(), 1.0)
        assert err <= 1e-5 * scale, f"{what}, tensor {i}: max error {err:.2e} at scale {scale:.2e}"
    assert ref[0].abs().max() > 0 and ref[1].abs().max() > 0, "vacuous comparison"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conv", [3, 0])
@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_lean_layer_function_equals_autograd_of_the_chunked_form(name, conv, kind, t):
    """DeltaLayerRecompute (projection, conv, norms and delta rule rebuilt per group in backward) gives the
    same o and the same gradients for x and every parameter as autograd through _project and the chunked
    form, with groups of 1 and 2 chunks of 4 (so the conv's history crosses group boundaries)."""
    m, x, mask, seg = _layer_case(name, t, kind, conv)

    def plain(xs):
        return delta_rule_chunked(*m._project(xs, mask, None, seg, torch.float32), chunk_size=min(4, t))[0]

    ref = _layer_grads(m, x, plain)
    for group in (1, 2):
        got = _layer_grads(m, x, lambda xs, g=group: m._lean(xs, mask, seg, torch.float32, 4, g))
        _assert_same(ref, got, f"chunks_per_group={group}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_lean_chunked_layer_equals_the_autograd_layer(name, kind, t):
    """The chunked form as trained (lean Function and HeadNormGate) == the same form by plain autograd."""
    m, x, mask, seg = _layer_case(name, t, kind)
    runs = [lambda xs, lean=lean: m._run("chunked", xs, mask, None, seg, lean=lean, chunk_size=4)[0]
            for lean in (False, True)]
    _assert_same(_layer_grads(m, x, runs[0]), _layer_grads(m, x, runs[1]), "lean layer")


def test_lean_layer_gradcheck():
    """float64 gradcheck of DeltaLayerRecompute on a tiny packed, padded case: groups of one chunk of 2,
    the last chunk padded, the conv's history crossing every group boundary."""
    gen = torch.Generator().manual_seed(0)
    b, t, d, h = 1, 5, 4, 2
    x = torch.randn(b, t, d, dtype=torch.float64, generator=gen)
    w = torch.randn(3 * d, d, dtype=torch.float64, generator=gen) / d**0.5
    conv = torch.randn(3 * d, 1, 3, dtype=torch.float64, generator=gen)
    beta = torch.rand(b, h, t, dtype=torch.float64, generator=gen)
    g = -0.5 * torch.rand(b, h, t, dtype=torch.float64, generator=gen)
    keep = (torch.arange(t) >= 1).to(torch.float64)[None, :, None]
    seg = (torch.arange(t) >= 3).long()[None]
    ins = [x.requires_grad_(), w.requires_grad_(), conv.requires_grad_(), beta.requires_grad_(), g.requires_grad_()]

    def fn(x, w, conv, beta, g):
        return DeltaLayerRecompute.apply(x, w, keep, conv, seg, beta, g, h, 2, 1)

    assert torch.autograd.gradcheck(fn, ins)


@pytest.mark.parametrize("gated", [False, True])
def test_head_norm_gate_gradcheck(gated):
    """float64 gradcheck of the lean per-head RMS norm (and output gate)."""
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(1, 2, 5, 3, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_()
    x = torch.randn(1, 5, 4, dtype=torch.float64, generator=gen).requires_grad_()
    wg = torch.randn(6, 4, dtype=torch.float64, generator=gen).requires_grad_()
    if gated:
        assert torch.autograd.gradcheck(lambda o, w, x, wg: HeadNormGate.apply(o, w, 1e-6, x, wg), [o, w, x, wg])
    else:
        assert torch.autograd.gradcheck(lambda o, w: HeadNormGate.apply(o, w, 1e-6, None, None), [o, w])
