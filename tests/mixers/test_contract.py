"""The mixer contract, checked for every registered mixer and direction automatically.

A new mechanism file gets these for free: fast forms == reference (outputs and gradients),
causality, padding invariance, decode == full forward, clear errors on bad input.
"""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.registry import MIXERS
from tests.helpers import case_id, make_mixer, mixer_cases, rel_err, with_form

CASES = mixer_cases()
LENGTHS = (1, 7, 13)  # length 1, prime lengths, not multiples of the small block/chunk sizes


def _random_keep(b: int, n: int, causal: bool, gen: torch.Generator) -> torch.Tensor:
    """A keep-mask with left padding (causal) or right padding (bidirectional) plus random holes."""
    keep = torch.rand(b, n, generator=gen) > 0.25
    for i in range(b):
        pad = int(torch.randint(0, max(1, n // 2), (1,), generator=gen))
        if causal:
            keep[i, :pad] = False
        else:
            keep[i, n - pad :] = False
        keep[i, -1 if causal else 0] = True  # at least one real token per row
    return keep


def _forms(name):
    return [f for f in MIXERS.get(name).capabilities.forms if f not in ("reference", "triton")]


def _run(m, x, mask=None):
    x = x.clone().requires_grad_(True)
    y, _ = m(x, mask=mask)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = [x.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fast_forms_match_reference(case):
    name, causal = case
    m = make_mixer(name, causal)
    tol = getattr(m, "form_tolerance", 1e-5)
    gen = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        x = torch.randn(2, n, m.d_model, generator=gen)
        masks = [None]
        if m.capabilities.padding_mask and n > 1:
            masks.append(_random_keep(2, n, causal, gen))
        for mask in masks:
            torch.manual_seed(3)
            y_ref, g_ref = _run(with_form(m, "reference"), x, mask)
            for form in _forms(name):
                torch.manual_seed(3)
                y, g = _run(with_form(m, form), x, mask)
                assert torch.isfinite(y).all()
                assert rel_err(y_ref, y) < tol, f"{form} output differs at n={n}, mask={mask is not None}"
                # A gradient that vanishes in exact arithmetic (d y / d q of a normalised kernel attention
                # over a single key) is rounding noise: it passes if it is noise on the input-gradient scale.
                floor = tol * g_ref[0].abs().max()
                for i, (a, b) in enumerate(zip(g_ref, g, strict=True)):
                    if a.abs().max() > 0:
                        close = rel_err(a, b) < tol * 10 or (a - b).abs().max() <= floor
                        assert close, f"{form} grad #{i} differs at n={n}"


@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=case_id)
def test_causal_future_never_changes_past(case):
    name, _ = case
    m = make_mixer(name, True)
    n, t = 13, 6
    x = torch.randn(2, n, m.d_model)
    x2 = x.clone()
    x2[:, t:] = torch.randn(2, n - t, m.d_model) * 3
    for form in ("reference", *_forms(name)):
        with_form(m, form)
        torch.manual_seed(3)
        y1, _ = m(x)
        torch.manual_seed(3)
        y2, _ = m(x2)
        assert torch.allclose(y1[:, :t], y2[:, :t], atol=1e-5), f"{form}: future tokens leaked into the past"
        assert not torch.allclose(y1[:, t:], y2[:, t:]), f"{form}: output ignores its input"


@pytest.mark.parametrize("case", [c for c in CASES if MIXERS.get(c[0]).capabilities.padding_mask], ids=case_id)
def test_padded_content_never_changes_real_outputs(case):
    name, causal = case
    m = make_mixer(name, causal)
    gen = torch.Generator().manual_seed(2)
    n = 13
    x = torch.randn(3, n, m.d_model, generator=gen)
    keep = _random_keep(3, n, causal, gen)
    x2 = torch.where(keep[..., None], x, torch.randn(x.shape, generator=gen) * 5)
    for form in ("reference", *_forms(name)):
        with_form(m, form)
        torch.manual_seed(3)
        y1, _ = m(x, mask=keep)
        torch.manual_seed(3)
        y2, _ = m(x2, mask=keep)
        assert torch.allclose(y1[keep], y2[keep], atol=1e-5), f"{form}: padded content leaked"
        assert (y1[~keep] == 0).all(), "outputs at padded positions must be zero"


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[1] and MIXERS.get(c[0]).capabilities.decode], ids=case_id
)
def test_decode_matches_full_forward(case):
    name, _ = case
    m = with_form(make_mixer(name, True), "reference")
    n = 11
    x = torch.randn(2, n, m.d_model)
    y_full, _ = m(x)
    # every form must consume and return a state ("auto" alone may pick the reference at short lengths)
    for form in ("auto", *_forms(name)):
        with_form(m, form)
        for chunks in ([1] * n, [4, 1, 6], [n]):  # token by token, mixed prefill, one prefill
            state = m.init_state(2, x.device, x.dtype)
            ys, i = [], 0
            for c in chunks:
                y, state = m(x[:, i : i + c], state=state)
                ys.append(y)
                i += c
            assert state.seen == n
            assert rel_err(y_full, torch.cat(ys, 1)) < 1e-5, f"{form}: decode in chunks {chunks} differs"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_gives_clear_errors(case):
    name, causal = case
    m = make_mixer(name, causal)
    with pytest.raises(ShapeError, match="x must be"):
        m(torch.randn(2, 5, m.d_model + 1))
    with pytest.raises(ShapeError, match="empty"):
        m(torch.randn(2, 0, m.d_model))
    if m.capabilities.padding_mask:
        with pytest.raises(ShapeError, match="mask"):
            m(torch.randn(2, 5, m.d_model), mask=torch.ones(2, 5))
    with pytest.raises(ConfigError, match=f"{name}.no_such_option"):
        MIXERS.get(name)(32, 4, causal=causal, options={"no_such_option": 1})
    with pytest.raises(ConfigError, match="n_heads"):
        MIXERS.get(name)(30, 4, causal=causal)
    caps = MIXERS.get(name).capabilities
    if not (caps.causal and caps.bidirectional):
        with pytest.raises(CapabilityError):
            MIXERS.get(name)(32, 4, causal=not causal)


@pytest.mark.parametrize("name", MIXERS.names())
def test_capabilities_are_declared_honestly(name):
    cls = MIXERS.get(name)
    caps = cls.capabilities
    assert "reference" in caps.forms and cls.__doc__ and caps.paper and caps.time and caps.memory
    for form in caps.forms:
        assert callable(getattr(cls, f"forward_{form}", None)), f"{name} declares form {form} but lacks it"
    if caps.decode:
        m = make_mixer(name, caps.causal)
        assert m.init_state(1, "cpu", torch.float32) is not None
