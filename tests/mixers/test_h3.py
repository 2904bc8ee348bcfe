"""H3: an independent oracle (shift-matrix SSM, materialised diagonal kernel), forms agree with states and
gradients, padding, bad options."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from tests.helpers import assert_forms_agree, make_mixer, rel_err, with_form

FORMS = ("reference", "fast", "recurrent")


def _oracle(m, x):
    """H3 written from the paper with explicit matrices: the shift SSM as x_t = S x_(t-1) + e_0 k_t with S
    the down-shift, k~_t = C x_t; the diagonal SSM by its materialised kernel sum_l K[l] u_(t-l) + D u_t;
    y_t = q_t^T S_t per head (head_dim 1: the elementwise q * SSM_diag(SSM_shift(k) * v))."""
    b, n, d = x.shape
    dh, w = m.opts.head_dim, m.opts.shift_size
    q, k, v = m.in_proj(x).chunk(3, -1)
    shift = torch.diag(torch.ones(w - 1), -1)  # (w, w): moves every slot one step older
    state, k_shift = torch.zeros(b, d, w), []
    for t in range(n):
        state = state @ shift.T
        state[..., 0] = k[:, t]
        k_shift.append((state * m.shift_kernel).sum(-1))
    k_shift = torch.stack(k_shift, 1)
    heads = d // dh
    u = (k_shift.view(b, n, heads, dh, 1) * v.view(b, n, heads, 1, dh)).reshape(b, n, -1)
    dt_a, _, b_bar, c = m._discretise()
    kernel = 2 * torch.einsum("em,eml->el", c * b_bar, torch.exp(dt_a[..., None] * torch.arange(n))).real
    s = torch.stack([(kernel[:, : t + 1].flip(-1) * u[:, : t + 1].transpose(1, 2)).sum(-1) for t in range(n)], 1)
    s = s + u * m.D
    if dh == 1:
        y = q * s
    else:
        y = torch.einsum("blhi,blhij->blhj", q.view(b, n, heads, dh), s.view(b, n, heads, dh, dh)).reshape(b, n, d)
    return m.out_proj(y)


@pytest.mark.parametrize("head_dim", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_every_form_equals_the_explicit_matrix_oracle(head_dim, n):
    m = make_mixer("h3", True, head_dim=head_dim)
    x = torch.randn(2, n, m.d_model)
    with torch.no_grad():
        want = _oracle(m, x)
        for form in FORMS:
            got, _ = with_form(m, form)(x)
            assert rel_err(want, got) < 1e-5, f"{form} at n={n}"


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "carried"])
def test_forms_agree_on_outputs_states_and_gradients(with_state):
    m = make_mixer("h3", True)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 13, 41):  # shorter and longer than the shift window (4)
        x = torch.randn(2, n, m.d_model, generator=gen)
        init = None
        if with_state:
            init = {"conv": torch.randn(2, m.d_model, 3, generator=gen),
                    "h": torch.randn(2, m.channels, m.modes, 2, generator=gen)}
        keep = torch.rand(2, n, generator=gen) > 0.3
        keep[:, -1] = True
        for mask in (None, keep):
            assert_forms_agree(m, FORMS, x, mask, init)


def test_shift_ssm_sees_exactly_its_window():
    """Output t depends on keys t - shift_size + 1 .. t through the shift SSM only: with the diagonal SSM
    made memoryless (no modes carry anything, D = 1), changing token t - shift_size leaves y_t unchanged."""
    m = make_mixer("h3", True, shift_size=3, head_dim=1)
    with torch.no_grad():
        m.C.zero_()
        m.D.fill_(1.0)
    x = torch.randn(1, 10, m.d_model)
    x2 = x.clone()
    x2[:, 4] += 5
    y1, _ = m(x)
    y2, _ = m(x2)
    changed = (y1 - y2).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * 4 + [True] * 3 + [False] * 3


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="h3.head_dim"):
        make_mixer("h3", True, head_dim=3)
    with pytest.raises(ConfigError, match="h3.shift_size"):
        make_mixer("h3", True, shift_size=0)
    with pytest.raises(ConfigError, match="h3.dt_min"):
        make_mixer("h3", True, dt_min=0.5, dt_max=0.1)
