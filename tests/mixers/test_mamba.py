"""Mamba (S6) and Mamba-2 (SSD): forms agree with states and gradients, padding, decode, stability."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.mamba import s6_scan_chunked, s6_scan_reference, ssd_scan_chunked, ssd_scan_reference
from tests.helpers import make_mixer, rel_err, with_form

NAMES = ("mamba", "mamba2")
LENGTHS = (1, 7, 13, 67)


def _left_pad_mask(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        keep[i, : int(torch.randint(0, n, (1,), generator=gen))] = False
    return keep


def _run(m, form, x, mask, init):
    """Outputs and final state tensors of one form, and gradients w.r.t. x, the initial state and the weights."""
    with_form(m, form)
    x = x.clone().requires_grad_(True)
    state = m.init_state(x.shape[0], "cpu", x.dtype)
    leaves = []
    for k, t in init.items():
        leaves.append(t.clone().requires_grad_(True))
        setattr(state, k, leaves[-1])
    y, state = m(x, mask=mask, state=state)
    outs = [y, *(getattr(state, k) for k in init)]
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    params = list(m.parameters())
    grads = torch.autograd.grad(loss, [x, *leaves, *params], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *leaves, *params], strict=True)]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("name,opts", [(n, {"chunk_size": c}) for n in NAMES for c in (3, 4)]
                         # the segmented fast scan: several segments, and one (None)
                         + [("mamba", {"checkpoint_every": k}) for k in (5, None)])
def test_forms_agree_on_outputs_states_and_gradients(name, opts):
    m = make_mixer(name, True, **opts)
    gen = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        x = torch.randn(2, n, m.d_model, generator=gen)
        st = m.init_state(2, "cpu", torch.float32)
        init = {"conv": torch.randn(st.conv.shape, generator=gen), "ssm": torch.randn(st.ssm.shape, generator=gen)}
        for mask in (None, _left_pad_mask(2, n, gen) if n > 1 else None):
            ref_out, ref_grad = _run(m, "reference", x, mask, init)
            for form in [f for f in m.capabilities.forms if f != "reference"]:
                out, grad = _run(m, form, x, mask, init)
                for i, (a, b) in enumerate(zip(ref_out, out, strict=True)):
                    assert rel_err(a, b) <= 1e-5, f"{form} output/state #{i} differs at n={n}"
                for i, (a, b) in enumerate(zip(ref_grad, grad, strict=True)):
                    assert rel_err(a, b) <= 1e-5, f"{form} gradient #{i} differs at n={n}"


@pytest.mark.parametrize("name", NAMES)
def test_chunked_scan_matches_sequential_scan_for_any_chunk(name):
    gen = torch.Generator().manual_seed(1)
    b, n, d, s = 2, 13, 6, 3
    if name == "mamba":
        u, delta = torch.randn(b, n, d, generator=gen), torch.rand(b, n, d, generator=gen)
        a = -torch.rand(d, s, generator=gen) * 4
        bb, cc, h = torch.randn(b, n, s, generator=gen), torch.randn(b, n, s, generator=gen), torch.randn(b, d, s)
        ref = s6_scan_reference(u, delta, a, bb, cc, h)
        got = [s6_scan_chunked(u, delta, a, bb, cc, h, c) for c in (1, 2, 5, 13, 64)]
    else:
        heads, p = 2, 3
        u, delta = torch.randn(b, n, heads, p, generator=gen), torch.rand(b, n, heads, generator=gen)
        a = -torch.rand(heads, generator=gen) * 4
        bb = torch.randn(b, n, heads, s, generator=gen)
        cc, h = torch.randn(b, n, heads, s, generator=gen), torch.randn(b, heads, p, s)
        ref = ssd_scan_reference(u, delta, a, bb, cc, h)
        got = [ssd_scan_chunked(u, delta, a, bb, cc, h, c) for c in (1, 2, 5, 13, 64)]
    for y, h_end in got:
        assert rel_err(ref[0], y) <= 1e-6 and rel_err(ref[1], h_end) <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_computes_what_the_unpadded_row_computes(name):
    m = make_mixer(name, True)
    x = torch.randn(1, 9, m.d_model)
    for form in m.capabilities.forms:
        with_form(m, form)
        y, st = m(x, state=m.init_state(1, "cpu", torch.float32))
        xp = torch.cat([torch.randn(1, 4, m.d_model) * 5, x], 1)
        keep = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
        yp, stp = m(xp, mask=keep, state=m.init_state(1, "cpu", torch.float32))
        assert rel_err(y, yp[:, 4:]) <= 1e-6, form
        assert rel_err(st.ssm, stp.ssm) <= 1e-6 and rel_err(st.conv, stp.conv) <= 1e-6, form


@pytest.mark.parametrize("name", NAMES)
def test_padded_step_leaves_the_ssm_state_unchanged(name):
    m = make_mixer(name, True)
    x = torch.randn(2, 5, m.d_model)
    for form in m.capabilities.forms:
        with_form(m, form)
        _, st = m(x, state=m.init_state(2, "cpu", torch.float32))
        before = st.ssm.clone()
        y, st = m(torch.randn(2, 3, m.d_model), mask=torch.zeros(2, 3, dtype=torch.bool), state=st)
        assert torch.equal(st.ssm, before), form
        assert (y == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_long_sequence_is_stable(name):
    m = make_mixer(name, True, chunk_size=64)
    x = torch.randn(1, 2048, m.d_model) * 3
    with torch.no_grad():
        y_fast, _ = with_form(m, "chunked")(x)
        y_ref, _ = with_form(m, "reference")(x)
    assert torch.isfinite(y_fast).all()
    assert rel_err(y_ref, y_fast) <= 1e-5


def test_mamba_uses_s4d_real_initialisation():
    m = make_mixer("mamba", True, d_state=5)
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, 6.0).expand(m.d_inner, 5))


def test_mamba2_groups_share_b_and_c():
    m = make_mixer("mamba2", True, n_groups=2, head_dim=8)  # d_inner 64 -> 8 heads, 4 per group
    assert m.ssd_heads == 8
    x = torch.randn(2, 9, m.d_model)
    y_ref, _ = with_form(m, "reference")(x)
    y_chk, _ = with_form(m, "chunked")(x)
    assert rel_err(y_ref, y_chk) <= 1e-5


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="mamba2.head_dim"):
        make_mixer("mamba2", True, head_dim=24)
    with pytest.raises(ConfigError, match="mamba2.n_groups"):
        make_mixer("mamba2", True, n_groups=3)
    with pytest.raises(ConfigError, match="mamba.dt_min"):
        make_mixer("mamba", True, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ConfigError, match="mamba.d_conv"):
        make_mixer("mamba", True, d_conv=0)
