"""One capability check (``Capabilities.why_not``) and one rule for whether a form runs here
(``form_why_not``), asked by every caller: the mixer, the model config, the bench and advise."""

from __future__ import annotations

import pytest
import torch

import efformer.mixers.base as base
from efformer.bench.advise import advise
from efformer.bench.cells import Cell
from efformer.errors import CapabilityError, ConfigError
from efformer.models.config import build_config
from efformer.nn.positional import PositionalContext, build_positional
from efformer.registry import MIXERS, POSITIONALS
from tests.helpers import make_mixer

NAMES = MIXERS.names()


def _requests(caps):
    """(request kwargs, whether the capabilities allow it) for every single-field request."""
    out = [
        (dict(causal=True), caps.causal),
        (dict(causal=False), caps.bidirectional),
        (dict(mask=True), caps.padding_mask),
        (dict(decode=True), caps.decode),
        (dict(positional="rotary"), caps.rotary),
        (dict(positional="bias"), caps.attention_bias),
        (dict(positional="embedding"), True),
        (dict(positional="none"), True),
        (dict(dtype=torch.bfloat16), "bfloat16" in caps.dtypes),
    ]
    out += [(dict(form=f), True) for f in caps.forms]
    out.append((dict(form="no_such_form"), False))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_why_not_gives_one_reason_per_missing_capability_and_none_otherwise(name):
    caps = MIXERS.get(name).capabilities
    for request, allowed in _requests(caps):
        reasons = caps.why_not(name, **request)
        if allowed:
            assert reasons == [], (request, reasons)
        else:
            assert len(reasons) == 1 and f"mixer {name!r}" in reasons[0], (request, reasons)
    assert caps.why_not(name) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_caller_uses_the_same_wording(name):
    """The config builder, the mixer constructor, bench cells and advise say the same sentence."""
    caps = MIXERS.get(name).capabilities
    if not caps.causal:
        want = caps.why_not(name, causal=True)[0]
        with pytest.raises(CapabilityError) as e:
            build_config(task="lm", mixer=name, positional="none")
        assert want in str(e.value)
        with pytest.raises(CapabilityError) as e:
            MIXERS.get(name)(32, 4, causal=True)
        assert want in str(e.value)
        assert Cell(name, "fwd", 16, causal=True).unsupported_reason() == want
        _, left_out = advise([], 1024, 1e9, causal=True)
        assert f"{name}: {want}" in left_out
    if not caps.decode:
        assert Cell(name, "decode", 16).unsupported_reason() == "; ".join(caps.why_not(name, causal=True, decode=True))
        _, left_out = advise([], 1024, 1e9, decode=True)
        assert any(line == f"{name}: {r}" for line in left_out for r in caps.why_not(name, causal=True, decode=True))
    for kind in ("rotary", "bias"):
        reasons = caps.why_not(name, positional=kind)
        scheme = next(p for p in POSITIONALS.names() if POSITIONALS.get(p).kind == kind)
        direction = {"task": "classifier"} if caps.bidirectional else {"task": "lm"}
        if reasons:
            with pytest.raises(CapabilityError) as e:
                build_config(mixer=name, positional=scheme, **direction)
            assert reasons[0] in str(e.value)
        else:
            build_config(mixer=name, positional=scheme, **direction)


@pytest.mark.parametrize("name", NAMES)
def test_a_mixer_refuses_a_context_it_cannot_take(name):
    caps = MIXERS.get(name).capabilities
    m = make_mixer(name, caps.causal)
    x = torch.randn(1, 5, m.d_model)
    positions = torch.arange(5)[None]
    for kind in ("rotary", "bias"):
        scheme = next(p for p in POSITIONALS.names() if POSITIONALS.get(p).kind == kind)
        ctx = build_positional(scheme, m.d_model, m.n_heads, 64, m.causal).context(positions, x.dtype)
        reasons = caps.why_not(name, positional=kind)
        if reasons:
            with pytest.raises(CapabilityError, match="cannot take"):
                m(x, positions=ctx)
        else:
            y, _ = m(x, positions=ctx)
            assert torch.isfinite(y).all()
    y_plain, _ = m(x, positions=PositionalContext(positions))
    assert torch.allclose(y_plain, m(x)[0])


# ---- forms: one rule decides, auto falls back -------------------------------------------------
TRITON_MIXERS = [n for n in NAMES if "triton" in MIXERS.get(n).capabilities.forms]


@pytest.mark.parametrize("name", TRITON_MIXERS)
def test_auto_falls_back_when_triton_cannot_run(name, monkeypatch):
    m = make_mixer(name, True)
    x = torch.randn(1, 5, m.d_model)
    monkeypatch.setattr(base, "triton_runs", lambda device: False)
    assert m.resolve_form(x, None) == "chunked"
    assert "triton" in m.form_why_not("triton", "cuda")[0]
    forced = make_mixer(name, True, form="triton")
    with pytest.raises(CapabilityError, match="triton form needs"):
        forced(x)
    monkeypatch.setattr(base, "triton_runs", lambda device: True)
    assert m.resolve_form(x, None) == "triton"  # where triton runs, auto takes it


@pytest.mark.parametrize("name", TRITON_MIXERS)
def test_auto_avoids_triton_for_head_dims_the_kernel_cannot_hold(name, monkeypatch):
    monkeypatch.setattr(base, "triton_runs", lambda device: True)
    m = make_mixer(name, True, d_model=2 * (base.TRITON_MAX_DIM + 8), n_heads=2)
    x = torch.randn(1, 3, m.d_model)
    assert m.resolve_form(x, None) == "chunked"
    assert "head dims" in m.form_why_not("triton", "cpu")[0]


def test_no_mixer_overrides_resolve_form():
    overriding = [n for n in NAMES if MIXERS.get(n).resolve_form is not base.Mixer.resolve_form]
    assert overriding == []


@pytest.mark.parametrize("name", NAMES)
def test_an_undeclared_form_is_refused_at_config_time(name):
    caps = MIXERS.get(name).capabilities
    missing = next(f for f in base.FORMS if f not in caps.forms) if set(base.FORMS) - set(caps.forms) else "nope"
    task = "lm" if caps.causal else "classifier"
    with pytest.raises(ConfigError, match=rf"mixer_options\[{name}\].form=.*has no form {missing!r}"):
        build_config(task=task, mixer=name, positional="none", mixer_options={"form": missing})
