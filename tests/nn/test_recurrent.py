"""Shared recurrent parts: the short convolution equals torch's depthwise conv1d and continues across
calls; the linear scan equals the plain loop, with exact gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.nn.recurrent import ShortConv, linear_scan


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_short_conv_equals_causal_depthwise_conv1d_and_continues_across_calls(width, bias):
    torch.manual_seed(0)
    conv = ShortConv(6, width, bias=bias).double()
    u = torch.randn(2, 11, 6, dtype=torch.float64)
    padded = F.pad(u.transpose(1, 2), (width - 1, 0))
    expected = F.conv1d(padded, conv.weight, conv.bias, groups=6).transpose(1, 2)
    y, prev = conv(u)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # two calls (prefill 5, then 6) == one call; one token at a time through step() == one call
    y1, p1 = conv(u[:, :5])
    y2, p2 = conv(u[:, 5:], p1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p2, prev)
    window, steps = torch.zeros(2, 6, width - 1, dtype=torch.float64), []
    for t in range(11):
        out, window = conv.step(u[:, t], window)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), expected, rtol=1e-12, atol=1e-12)


def test_short_conv_gradients_match_conv1d():
    torch.manual_seed(1)
    conv = ShortConv(5, 4).double()
    u = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, p: conv(u, p)[0], (u, prev))
    full = torch.cat([prev, u.transpose(1, 2)], -1)
    g = torch.randn(2, 9, 5, dtype=torch.float64)
    ours = torch.autograd.grad((conv(u, prev)[0] * g).sum(), [conv.weight, conv.bias])
    theirs = torch.autograd.grad((F.conv1d(full, conv.weight, conv.bias, groups=5).transpose(1, 2) * g).sum(),
                                 [conv.weight, conv.bias])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _loop_scan(a, b, h):
    out = []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize("length", [1, 2, 13])
def test_linear_scan_equals_the_loop_with_exact_gradients(length):
    gen = torch.Generator().manual_seed(length)
    a = torch.rand(length, 2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(length, 2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    torch.testing.assert_close(linear_scan(a, b, h0), _loop_scan(a, b, h0), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))


def test_linear_scan_broadcasts_its_initial_state_and_decays():
    a = torch.full((4, 1, 3), 0.5, dtype=torch.float64, requires_grad=True)  # one decay for every row
    b = torch.ones(4, 2, 3, dtype=torch.float64)
    h0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = linear_scan(a, b, h0)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 1.5, 1.75, 1.875], dtype=torch.float64))
    out.sum().backward()
    assert a.grad.shape == a.shape and h0.grad.shape == h0.shape
