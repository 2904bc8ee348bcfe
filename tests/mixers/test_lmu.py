"""LMU: the paper's closed-form A and B, zero-order hold, the memory is a Legendre window, forms agree."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.lmu import legendre_ab, legendre_memory, shifted_legendre
from tests.helpers import assert_forms_agree, make_mixer


def test_closed_form_matrices_match_the_paper_by_hand():
    a, b = legendre_ab(3)
    assert torch.equal(a, torch.tensor([[-1.0, -1, -1], [3, -3, -3], [-5, 5, -5]], dtype=torch.float64))
    assert torch.equal(b, torch.tensor([1.0, -3, 5], dtype=torch.float64))


def test_zero_order_hold():
    a, b = legendre_ab(7)
    theta = 13.0
    a_bar, b_bar = legendre_memory(7, theta)
    assert torch.allclose(a_bar, torch.linalg.matrix_exp(a / theta), atol=1e-12)
    want_b = torch.linalg.solve(a, (a_bar - torch.eye(7, dtype=torch.float64)) @ b)  # A^-1 (A_bar - I) B
    assert torch.allclose(b_bar, want_b, atol=1e-10)


def _window_error(order: int, theta: float = 100.0) -> float:
    """Largest error of u(t - r theta) read back from the memory at t as sum_i P~_i(r) m_i(t), r in [0, 1].

    Zero-order hold feeds u_k as a constant over the step (k - 1, k], so the read points sit mid-step.
    """
    a_bar, b_bar = legendre_memory(order, theta)
    t = torch.arange(700, dtype=torch.float64)
    u = torch.sin(2 * torch.pi * t / 230) + 0.5 * torch.cos(2 * torch.pi * t / 97)
    m, ms = torch.zeros(order, dtype=torch.float64), []
    for k in range(len(t)):
        m = a_bar @ m + b_bar * u[k]
        ms.append(m)
    ms = torch.stack(ms)
    worst = 0.0
    for delay in (0, 25, 50, 75, 99):
        read = ms[300:] @ shifted_legendre(order, torch.tensor((delay + 0.5) / theta, dtype=torch.float64))
        worst = max(worst, (read - u[300 - delay : 700 - delay]).abs().max().item())
    return worst


def test_memory_holds_the_legendre_coefficients_of_its_window_and_improves_with_order():
    errors = [_window_error(d) for d in (4, 8, 32)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.005  # of a signal with amplitude up to 1.5 (order 32 measured 9e-4)


def test_shifted_legendre_is_orthogonal_on_the_unit_interval():
    r = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    p = shifted_legendre(6, r)
    gram = p.T @ p / len(r)
    assert torch.allclose(gram, torch.diag(1 / (2 * torch.arange(6, dtype=torch.float64) + 1)), atol=1e-6)


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "carried"])
def test_parallel_form_equals_the_recurrence(with_state):
    m = make_mixer("lmu", True, order=12, theta=20.0, channels=3)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 13, 67):
        x = torch.randn(2, n, m.d_model, generator=gen)
        init = {"m": torch.randn(2, 3, 12, generator=gen)} if with_state else None
        keep = torch.rand(2, n, generator=gen) > 0.3
        keep[:, -1] = True
        for mask in (None, keep):
            assert_forms_agree(m, ("reference", "fast"), x, mask, init)


def test_defaults_and_bad_options():
    m = make_mixer("lmu", True, max_len=300, theta=None, channels=None)
    assert m.theta == 300.0 and m.n_channels == m.n_heads
    for bad in ({"order": 0}, {"theta": -1.0}, {"channels": 0}):
        with pytest.raises(ConfigError, match=f"lmu.{next(iter(bad))}"):
            make_mixer("lmu", True, **bad)
