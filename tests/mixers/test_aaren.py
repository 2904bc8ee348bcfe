"""Aaren: scan == recurrence == explicit softmax (outputs, states, gradients), padding, decode, stability."""

from __future__ import annotations

import math

import torch

from efformer.mixers.aaren import combine, prefix_scan
from tests.helpers import make_mixer, rel_err, with_form

FORMS = ("reference", "fast", "recurrent")
LENGTHS = (1, 7, 13, 67)


def _random_state(b: int, h: int, d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A non-trivial running triple: any max, positive denominator, any numerator."""
    return {
        "m": torch.randn(b, h, generator=gen),
        "u": torch.rand(b, h, generator=gen) + 0.5,
        "w": torch.randn(b, h, d, generator=gen),
    }


def _run(m, form, x, mask, init):
    """Outputs and final triple of one form, and gradients w.r.t. x, the initial triple and the weights."""
    with_form(m, form)
    x = x.clone().requires_grad_(True)
    state, leaves = m.init_state(x.shape[0], "cpu", x.dtype), []
    for k, t in init.items():
        leaves.append(t.clone().requires_grad_(True))
        setattr(state, k, leaves[-1])
    y, state = m(x, mask=mask, state=state)
    outs = [y, state.m, state.u, state.w]
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, *leaves, *m.parameters()])
    return [o.detach() for o in outs], grads


def _keep(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Left padding plus random holes."""
    keep = torch.rand(b, n, generator=gen) > 0.25
    for i in range(b):
        keep[i, : int(torch.randint(0, n // 2 + 1, (1,), generator=gen))] = False
    return keep


def test_forms_agree_on_outputs_states_and_gradients():
    m = make_mixer("aaren", True)
    gen = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        x = torch.randn(2, n, m.d_model, generator=gen)
        for init in ({}, _random_state(2, m.n_heads, m.head_dim, gen)):
            for mask in (None, _keep(2, n, gen) if n > 1 else None):
                ref_out, ref_grad = _run(m, "reference", x, mask, init)
                for form in FORMS[1:]:
                    out, grad = _run(m, form, x, mask, init)
                    for i, (a, b) in enumerate(zip(ref_out, out, strict=True)):
                        if torch.isinf(a).any():  # the max of an all-padded row is -inf in every form
                            assert torch.equal(torch.isinf(a), torch.isinf(b))
                            a, b = a.nan_to_num(neginf=0), b.nan_to_num(neginf=0)
                        assert rel_err(a, b) <= 1e-5, f"{form} output/state #{i} differs at n={n}"
                    for i, (a, b) in enumerate(zip(ref_grad, grad, strict=True)):
                        assert rel_err(a, b) <= 1e-5, f"{form} gradient #{i} differs at n={n}"


def test_output_is_softmax_of_the_learned_query_over_each_prefix():
    m = make_mixer("aaren", True)
    n, h, d = 9, m.n_heads, m.head_dim
    x = torch.randn(2, n, m.d_model)
    k, v = m.split_heads(m.kv_proj(x), 2 * h).chunk(2, dim=1)  # (b, h, n, d)
    expected = []
    for t in range(n):
        p = torch.softmax(torch.einsum("bhnd,hd->bhn", k[:, :, : t + 1], m.query) / math.sqrt(d), dim=-1)
        expected.append(torch.einsum("bhn,bhnd->bhd", p, v[:, :, : t + 1]))
    expected = m.out_proj(m.merge_heads(torch.stack(expected, 2)))
    for form in FORMS:
        y, _ = with_form(m, form)(x)
        assert rel_err(expected, y) <= 1e-6, form


def test_combination_is_associative_with_the_empty_triple_as_identity():
    gen = torch.Generator().manual_seed(3)
    a, b, c = (
        (torch.randn(5, generator=gen) * 10, torch.rand(5, generator=gen) + 0.1, torch.randn(5, 3, generator=gen))
        for _ in range(3)
    )
    left = combine(*combine(*a, *b), *c)
    right = combine(*a, *combine(*b, *c))
    for x, y in zip(left, right, strict=True):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    empty = (torch.full((5,), float("-inf")), torch.zeros(5), torch.zeros(5, 3))
    for x, y in zip(combine(*empty, *a), a, strict=True):
        assert torch.equal(x, y)
    both_empty = combine(*empty, *empty)
    assert torch.isneginf(both_empty[0]).all() and (both_empty[1] == 0).all() and (both_empty[2] == 0).all()


def test_prefix_scan_equals_a_left_fold():
    gen = torch.Generator().manual_seed(4)
    n = 13
    m, u, w = torch.randn(2, 3, n, generator=gen) * 5, torch.ones(2, 3, n), torch.randn(2, 3, n, 4, generator=gen)
    sm, su, sw = prefix_scan(m, u, w)
    acc = (m[:, :, 0], u[:, :, 0], w[:, :, 0])
    for t in range(1, n):
        acc = combine(*acc, m[:, :, t], u[:, :, t], w[:, :, t])
        for x, y in zip(acc, (sm[:, :, t], su[:, :, t], sw[:, :, t]), strict=True):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_padded_step_leaves_the_state_unchanged_and_left_padding_is_invisible():
    m = make_mixer("aaren", True)
    x = torch.randn(1, 6, m.d_model)
    xp = torch.cat([torch.randn(1, 3, m.d_model) * 5, x], 1)
    keep = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], 1)
    for form in FORMS:
        with_form(m, form)
        y, st = m(x, state=m.init_state(1, "cpu", torch.float32))
        yp, stp = m(xp, mask=keep, state=m.init_state(1, "cpu", torch.float32))
        assert rel_err(y, yp[:, 3:]) <= 1e-6 and (yp[:, :3] == 0).all(), form
        before = [t.clone() for t in (stp.m, stp.u, stp.w)]
        _, stp = m(torch.randn(1, 2, m.d_model), mask=torch.zeros(1, 2, dtype=torch.bool), state=stp)
        for a, b in zip(before, (stp.m, stp.u, stp.w), strict=True):
            assert torch.equal(a, b), form
        for a, b in zip((st.m, st.u, st.w), (stp.m, stp.u, stp.w), strict=True):
            assert rel_err(a, b) <= 1e-6, form


def test_long_sequence_with_sharp_scores_is_stable():
    m = make_mixer("aaren", True)
    with torch.no_grad():
        m.query.mul_(30)  # scores of hundreds: exp would overflow without the running max
    x = torch.randn(1, 2048, m.d_model)
    with torch.no_grad():
        y_fast, _ = with_form(m, "fast")(x)
        y_rec, _ = with_form(m, "recurrent")(x)
    assert torch.isfinite(y_fast).all()
    assert rel_err(y_rec, y_fast) <= 1e-5
