"""The one-gate-per-head chunked form's closed-form backward: equal to autograd of the chunked form,
gradcheck in float64 at odd lengths, groups that split the chunks, and packed resets."""

from __future__ import annotations

import pytest
import torch

from efformer.kernels.chunk_gla import chunk_gla_recompute, chunk_gla_torch, gla_parallel
from efformer.mixers.base import RESET_LOG_DECAY
from tests.helpers import rel_err
from tests.kernels.test_chunk_gla import _inputs, _run


def _with_resets(ins, every=5):
    """Log-gates with a reset (a segment start of packed rows) every ``every`` steps."""
    q, k, v, g, s0 = (x.detach() for x in ins)
    g = g.clone()
    g[:, :, ::every] = RESET_LOG_DECAY
    return [x.requires_grad_() for x in (q, k, v, g, s0)]


@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("t", [1, 7, 13, 67])
def test_matches_autograd_of_the_chunked_form(t, resets):
    ins = _inputs(t, "scalar")
    ins = _with_resets(ins) if resets else ins
    o_ref, s_ref, g_ref = _run(gla_parallel, ins)
    for cs, group in ((4, 1), (8, 3), (16, 16)):
        o, s, grads = _run(lambda *a, cs=cs, group=group: chunk_gla_recompute(*a, cs, cs, group), ins)
        assert rel_err(o_ref, o) < 1e-5 and rel_err(s_ref, s) < 1e-5, f"chunk {cs}, group {group}"
        ref = _run(lambda *a, cs=cs: chunk_gla_torch(*a, chunk_size=cs, sub_chunk=cs), ins)[2]
        for label, a, b, c in zip("q k v g s0".split(), g_ref, ref, grads, strict=True):
            # A reset step's gate gradient is ~e^-30 (and unused: resets are filled in, not learned);
            # the closed form gives it up to fp32 rounding of O(1) terms, so compare on the O(1) scale.
            close = (a - c).abs().max() <= 1e-5 * max(1.0, a.abs().max()) and (b - c).abs().max() <= 1e-5 * max(
                1.0, b.abs().max())
            assert close, f"grad {label}: t={t} chunk {cs} group {group}"


@pytest.mark.parametrize(("t", "resets"), [(1, False), (11, False), (11, True)])
def test_gradcheck(t, resets):
    """float64 gradcheck with groups of two chunks of 3 steps: a padded last chunk, states across groups."""
    ins = [x.detach().double().requires_grad_() for x in _inputs(t, "scalar", b=1, h=2, dk=3, dv=2)]
    ins = _with_resets(ins, 4) if resets else ins
    assert torch.autograd.gradcheck(lambda *a: chunk_gla_recompute(*a, 3, 3, 2), ins)


def test_backs_up_only_the_state_or_only_the_output():
    q, k, v, g, s0 = _inputs(9, "scalar")
    for pick, wrt in ((1, (k, g, s0)), (0, (q, v, g))):
        got = torch.autograd.grad(chunk_gla_recompute(q, k, v, g, s0, 4, 4, 1)[pick].sum(), wrt)
        ref = torch.autograd.grad(chunk_gla_torch(q, k, v, g, s0, 4, 4)[pick].sum(), wrt)
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(ref, got, strict=True))
