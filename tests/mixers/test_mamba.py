"""Mamba (S6) and Mamba-2 (SSD): forms agree with states and gradients, padding, decode, stability."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers import mamba as mamba_module
from efformer.mixers.base import segment_starts
from efformer.mixers.mamba import s6_scan_chunked, s6_scan_reference, ssd_scan_chunked, ssd_scan_reference
from efformer.registry import MIXERS
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


def _mamba2_grads(m, x, mask, seg, lean: bool):
    """[y, dx, d every parameter] of <chunked layer(x), fixed cotangent>, lean (Mamba2Recompute) or by autograd."""
    m.zero_grad()
    xs = x.clone().requires_grad_(True)
    if lean:
        y, _ = m.forward_chunked(xs, mask=mask, state=None, pos=SimpleNamespace(segments=seg))
    else:
        y, _ = m._forward(xs, mask, None, m._scan_chunked, segments=seg)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)).sum().backward()
    return [y.detach(), xs.grad] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_mamba2_lean_chunked_equals_autograd(t, kind, monkeypatch):
    """Mamba2Recompute (each group of chunks re-run under autograd in backward) gives the chunked form's
    output and the same gradients for x and every parameter, with groups of 1, 2 and 16 chunks of 4
    (so the conv's history and the state cross group boundaries)."""
    m = make_mixer("mamba2", True)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(2, t, m.d_model, generator=gen)
    mask = seg = None
    if kind == "padded":  # row 1 left-padded by up to 3 steps
        mask = torch.arange(t)[None] >= torch.tensor([[0], [min(3, t - 1)]])
    if kind == "packed":  # two segments per row, split at different places
        seg = (torch.arange(t)[None] >= torch.tensor([[t // 2], [t // 3]])).long()
    ref = _mamba2_grads(m, x, mask, seg, lean=False)
    assert ref[0].abs().max() > 0 and ref[1].abs().max() > 0
    for group in (1, 2, 16):
        monkeypatch.setattr(mamba_module, "CHUNKS_PER_GROUP", group)
        for i, (a, b) in enumerate(zip(ref, _mamba2_grads(m, x, mask, seg, lean=True), strict=True)):
            err, scale = (b - a).abs().max().item(), max(a.abs().max().item(), 1.0)
            assert err <= 1e-5 * scale, f"group {group}, tensor {i}: max error {err:.2e} at scale {scale:.2e}"


def test_mamba2_recompute_gradcheck():
    """float64 gradcheck of Mamba2Recompute (x and every parameter it takes): packed and padded, groups
    of one chunk of 2, the last chunk padded."""
    m = MIXERS.get("mamba2")(8, 2, causal=True, options={"d_state": 2, "chunk_size": 2, "expand": 1}).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64, generator=gen)
    keep = (torch.arange(5) >= 1).to(torch.float64)[None, :, None]
    seg = (torch.arange(5) >= 3).long()[None]
    o = m.opts
    cfg = (m.d_inner, m.conv_channels, m.ssd_heads, o.n_groups, o.d_state, o.chunk_size, o.norm_eps)
    params = (m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm_weight)
    ins = [t.detach().clone().requires_grad_() for t in (x, *params)]

    def fn(x, *ps):
        return mamba_module.Mamba2Recompute.apply(cfg, 2, x, keep, seg, segment_starts(seg), *ps)

    assert torch.autograd.gradcheck(fn, ins, fast_mode=True)  # random directions: ~10x fewer calls
