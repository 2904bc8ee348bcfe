"""LongVQ: nearest-code assignment, the codebook-equals-keys limit (softmax), straight-through gradients,
error falling with codebook size, an O(S) decode memory, bad options."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.nn.positional import PositionalContext
from efformer.registry import MIXERS
from tests.helpers import make_mixer, rel_err, softmax_twin_of, with_form

DIRECTIONS = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


def _keys(m, x):
    pos = PositionalContext(torch.arange(x.shape[1])[None])
    return m._qkv(x, pos)[1]  # (1, kv, n, d)


def test_assign_picks_the_nearest_code():
    m = make_mixer("longvq", False, codebook_size=7)
    k = torch.randn(2, 2, 9, 8)
    dist = (k[:, :, :, None] - m.codebook[None, :, None]).norm(dim=-1)  # (b, kv, n, S)
    assert torch.equal(m.assign(k), dist.argmin(-1))


@DIRECTIONS
def test_codebook_equal_to_the_keys_is_softmax(causal):
    """S = N codes set to the sequence's own keys: every key quantizes to itself, so attention is exact."""
    n = 11
    m = make_mixer("longvq", causal, codebook_size=n, chunk=4)
    x = torch.randn(1, n, m.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.codebook.copy_(_keys(m, x)[0])
    want, _ = softmax_twin_of(m, {"codebook"})(x)
    for form in ("reference", "chunked"):
        got, _ = with_form(m, form)(x)
        assert rel_err(want, got) < 1e-5, form
    if causal:  # and decoding token by token, through the per-code memory
        state, ys = m.init_state(1, "cpu", torch.float32), []
        for t in range(n):
            y, state = m(x[:, t : t + 1], state=state)
            ys.append(y)
        assert rel_err(want, torch.cat(ys, 1)) < 1e-5


def test_error_falls_as_the_codebook_grows():
    """Nested codebooks (the first S keys of the sequence): quantization, and the output error, shrink."""
    n, errs = 16, []
    for s in (1, 4, 8, 16):
        total = 0.0
        for seed in range(3):
            m = make_mixer("longvq", False, codebook_size=s)
            x = torch.randn(1, n, m.d_model, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                m.codebook.copy_(_keys(m, x)[0, :, :s])
            total += rel_err(softmax_twin_of(m, {"codebook"})(x)[0], m(x)[0])
        errs.append(total / 3)
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-5


@DIRECTIONS
def test_straight_through_gradients_reach_keys_and_codebook(causal):
    """The key rows of kv_proj get a gradient (straight-through), and so do the codes in use (only those)."""
    m = make_mixer("longvq", causal, codebook_size=64, chunk=4)
    x = torch.randn(2, 9, m.d_model)
    for form in ("reference", "chunked"):
        y, _ = with_form(m, form)(x)
        (y * torch.randn_like(y)).sum().backward()
        key_rows = m.kv_proj.weight.grad[: m.n_kv_heads * m.head_dim]
        assert key_rows.abs().sum() > 0, form
        used = torch.zeros(m.n_kv_heads, 64, dtype=torch.bool)
        for kv in range(m.n_kv_heads):
            used[kv, m.assign(_keys(m, x[:1]))[0, kv]] = True
            used[kv, m.assign(_keys(m, x[1:]))[0, kv]] = True
        touched = m.codebook.grad.abs().sum(-1) > 0
        assert torch.equal(touched, used), form
        m.zero_grad(set_to_none=True)


def test_decode_memory_is_codebook_sized_and_exact_with_left_padding():
    m = with_form(make_mixer("longvq", True, codebook_size=5, chunk=4), "reference")
    n = 19
    x = torch.randn(2, n, m.d_model)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :6] = False
    want, _ = m(x, mask=keep)
    for form, chunks in (("reference", [1] * n), ("chunked", [1] * n), ("chunked", [5, 1, 13])):
        state, ys, i = m.init_state(2, "cpu", torch.float32), [], 0
        for c in chunks:
            y, state = with_form(m, form)(x[:, i : i + c], mask=keep[:, i : i + c], state=state)
            ys.append(y)
            i += c
        assert rel_err(want, torch.cat(ys, 1)) < 1e-5, (form, chunks)
        assert state.u.shape == (2, m.n_kv_heads, 5, m.head_dim)  # whatever the length
        assert torch.equal(state.count.sum((1, 2)), keep.sum(1).float() * m.n_kv_heads)


@pytest.mark.parametrize("field", ["codebook_size", "chunk"])
def test_zero_sizes_are_refused(field):
    with pytest.raises(ConfigError, match=rf"longvq\.{field}=0"):
        MIXERS.get("longvq")(32, 4, options={field: 0})
