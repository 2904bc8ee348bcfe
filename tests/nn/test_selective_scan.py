"""The segmented selective scan equals the sequential S6 scan: outputs, final state and every gradient."""

from __future__ import annotations

import pytest
import torch

from efformer.mixers.mamba import s6_scan_reference
from efformer.nn.selective_scan import selective_scan


def _inputs(b, seq, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, seq, d, generator=g, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(b, seq, d, generator=g, dtype=torch.float64))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2
    B = torch.randn(b, seq, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, seq, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, d, n, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (u, delta, A, B, C, h0)]


@pytest.mark.parametrize("length,segment", [(1, 64), (7, 3), (13, 1), (29, 5), (64, 16), (67, 64)])
def test_outputs_states_and_gradients_equal_the_sequential_scan(length, segment):
    args = _inputs(2, length, 3, 4)
    reset = torch.zeros(2, length, dtype=torch.bool)
    reset[1, length // 2] = True  # a packed segment starts here in row 1
    y, h = selective_scan(*args, reset=reset, segment=segment)
    y_ref, h_ref = s6_scan_reference(*args, reset=reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), args)
    want = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), args)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_gradcheck_without_resets_and_with_a_broadcast_initial_state():
    u, delta, A, B, C, _ = _inputs(1, 9, 2, 3, seed=1)
    h0 = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, segment=4), (u, delta, A, B, C, h0))
