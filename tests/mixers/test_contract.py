"""The mixer contract, checked for every registered mixer and direction automatically.

A new mechanism file gets these for free: fast forms == reference (outputs and gradients), also under
every rotary and bias scheme it declares; causality, padding invariance, decode == full forward in
every form; bfloat16 runs; every parameter gets a gradient; clear errors on bad input.
"""

from __future__ import annotations

import copy

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.nn.positional import build_positional
from efformer.registry import MIXERS, POSITIONALS
from tests.helpers import WithPositional, case_id, make_mixer, mixer_cases, rel_err, with_form

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
    g = torch.randn(y.shape, dtype=y.dtype)  # not randn_like: it follows y's memory layout, which forms may differ in
    (y * g).sum().backward()
    grads = [x.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return y.detach(), grads


def _check_fast_forms_match_reference(m, name, causal):
    """Every fast form of ``m`` (a mixer, or one wrapped with a positional scheme) == its reference form,
    outputs and the gradients of the input and of every parameter (the scheme's included)."""
    tol = getattr(m, "form_tolerance", 1e-5)
    gen = torch.Generator().manual_seed(1)
    for n in getattr(m, "test_lengths", LENGTHS):  # 2-D mixers: lengths of odd-sided grids
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


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fast_forms_match_reference(case):
    name, causal = case
    _check_fast_forms_match_reference(make_mixer(name, causal), name, causal)


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


def _check_decode(m, name):
    """Decoding ``m`` token by token, in mixed pieces and in one prefill == its full reference forward,
    in "auto" and in every declared form but triton (which needs CUDA or the interpreter)."""
    with_form(m, "reference")
    n = 11
    x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(6))
    y_full, _ = m(x)
    forms = [f for f in MIXERS.get(name).capabilities.forms if f != "triton"]
    for form in ("auto", *forms):
        with_form(m, form)
        for chunks in ([1] * n, [4, 1, 6], [n]):  # token by token, mixed prefill, one prefill
            state = m.init_state(2, x.device, x.dtype)
            ys, i = [], 0
            for c in chunks:
                y, state = m(x[:, i : i + c], state=state)
                ys.append(y)
                i += c
            assert state.seen == n
            tol = getattr(m, "form_tolerance", 1e-5)  # the mixer's own float32 form tolerance, if it states one
            assert rel_err(y_full, torch.cat(ys, 1)) < tol, f"{form}: decode in chunks {chunks} differs"


DECODE_CASES = [c for c in CASES if c[1] and MIXERS.get(c[0]).capabilities.decode]


@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_decode_matches_full_forward(case):
    name, _ = case
    _check_decode(make_mixer(name, True), name)


# ---- positional schemes inside mixers ------------------------------------------------------
def _schemes(kind: str) -> list[str]:
    return [n for n in POSITIONALS.names() if POSITIONALS.get(n).kind == kind]


POSITIONAL_CASES = [
    (name, causal, scheme)
    for name, causal in CASES
    for kind, declared in (("rotary", "rotary"), ("bias", "attention_bias"))
    if getattr(MIXERS.get(name).capabilities, declared)
    for scheme in _schemes(kind)
]


def _with_scheme(name: str, causal: bool, scheme: str) -> WithPositional:
    """The test mixer called with ``scheme``'s context; learned schemes get random weights (T5's table
    starts at zero, which would make its bias, and every gradient into it, vanish)."""
    m = make_mixer(name, causal)
    torch.manual_seed(4)
    pos = build_positional(scheme, m.d_model, m.n_heads, m.max_len, causal)
    with torch.no_grad():
        for p in pos.parameters():
            if p.dim():  # tables and MLP weights; FIRE's scalar c and threshold keep their init
                p.normal_(0.0, 0.5)
    return WithPositional(m, pos)


def _pos_id(case) -> str:
    return f"{case_id(case[:2])}-{case[2]}"


@pytest.mark.parametrize("case", POSITIONAL_CASES, ids=_pos_id)
def test_fast_forms_match_reference_under_positional_schemes(case):
    name, causal, scheme = case
    _check_fast_forms_match_reference(_with_scheme(name, causal, scheme), name, causal)


@pytest.mark.parametrize(
    "case", [c for c in POSITIONAL_CASES if c[1] and MIXERS.get(c[0]).capabilities.decode], ids=_pos_id
)
def test_decode_matches_full_forward_under_positional_schemes(case):
    name, causal, scheme = case
    _check_decode(_with_scheme(name, causal, scheme), name)


def _takes_every_kind(name: str) -> bool:
    caps = MIXERS.get(name).capabilities
    return caps.rotary and caps.attention_bias


@pytest.mark.parametrize("name", [n for n in MIXERS.names() if not _takes_every_kind(n)])
def test_mixer_refuses_a_positional_kind_it_does_not_declare(name):
    caps = MIXERS.get(name).capabilities
    m = make_mixer(name, caps.causal)
    x, pos = torch.randn(1, 5, m.d_model), torch.arange(5)[None]
    for kind, declared, words in (
        ("rotary", caps.rotary, "cannot take a rotary scheme"),
        ("bias", caps.attention_bias, "cannot take an additive attention bias"),
    ):
        if declared:
            continue
        ctx = build_positional(_schemes(kind)[0], m.d_model, m.n_heads, m.max_len, caps.causal).context(pos, x.dtype)
        assert ctx.kind == kind
        with pytest.raises(CapabilityError, match=words):
            m(x, positions=ctx)
        assert caps.why_not(name, positional=kind), f"why_not must give the reason for {kind}"


# ---- dtypes and gradients ------------------------------------------------------------------
# bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Measured over every mixer and three
# seeds at n=13, the relative RMS error to fp32 with the same (rounded) weights is 4e-3 to 1.1e-2
# (the scans and low-rank solves at the top); 3e-2 leaves about 3x margin and still catches a mixer
# that silently computes something else in bf16.
BF16_TOL = 3e-2


def _median_token_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Median over tokens of ||ref_t - got_t|| / ||ref_t|| for (b, n, d) outputs."""
    ref, got = ref.double().flatten(0, 1), got.double().flatten(0, 1)
    keep = ref.norm(dim=-1) > 0  # padded positions are zero in both
    return ((ref - got).norm(dim=-1)[keep] / ref.norm(dim=-1)[keep]).median().item()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bfloat16_runs_and_stays_close_to_float32(case):
    name, causal = case
    m = make_mixer(name, causal)
    gen = torch.Generator().manual_seed(7)
    n = 13
    x = torch.randn(2, n, m.d_model, generator=gen)
    mask = _random_keep(2, n, causal, gen) if m.capabilities.padding_mask else None
    torch.manual_seed(3)
    y32, _ = m(x, mask=mask)
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16).requires_grad_(True)
    torch.manual_seed(3)
    y16, _ = m16(x16, mask=mask)
    assert y16.dtype == torch.bfloat16
    assert torch.isfinite(y16).all()
    (y16.float() * torch.randn(y16.shape, generator=gen)).sum().backward()
    for pname, g in [("x", x16.grad), *((k, p.grad) for k, p in m16.named_parameters() if p.requires_grad)]:
        assert g is not None and torch.isfinite(g).all(), f"{pname}: no finite bf16 gradient"
    if m.capabilities.family == "hashing":
        # Buckets are an argmax: bf16 rounding legitimately flips a near-tie token into another bucket,
        # changing its whole attention set, so only the typical token is held to the tolerance.
        err = _median_token_error(y32, y16)
    else:
        err = rel_err(y32, y16)
    assert err < BF16_TOL, f"bf16 output is {err:.3g} away from fp32"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_parameter_gets_a_gradient(case):
    name, causal = case
    m = make_mixer(name, causal)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 13, m.d_model, generator=gen, requires_grad=True)  # a mixer may have no parameters (FNet)
    y, _ = m(x)
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    for pname, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} never reaches the output"
            assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
            assert (p.grad != 0).any(), f"{pname}: gradient identically zero"


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
