"""The preallocated KV cache: in-place writes == concatenation, growth past capacity, select after
growth, gradients through a cached forward, logits_to_keep == the slice of the full logits."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.mixers.local import SlidingWindowAttention
from efformer.mixers.softmax import SoftmaxAttention

D, H = 32, 4


def _lm(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=256)
    return efformer.create_model("lm-tiny", **{**base, **kw}).eval()


def _decode(m, x, chunks, mask=None):
    """Outputs of ``x`` fed to mixer ``m`` in ``chunks`` through one state; and the state."""
    state = m.init_state(x.shape[0], x.device, x.dtype)
    ys, i = [], 0
    for c in chunks:
        y, state = m(x[:, i : i + c], state=state, mask=None if mask is None else mask[:, i : i + c])
        ys.append(y)
        i += c
    return torch.cat(ys, 1), state


MIXERS = [
    lambda: SoftmaxAttention(D, H, causal=True, options={"n_kv_heads": 2}),
    lambda: SlidingWindowAttention(D, H, causal=True, options={"window": 5}),
]


@pytest.mark.parametrize("make", MIXERS, ids=["softmax", "sliding_window"])
def test_in_place_cache_equals_concatenated_cache(make):
    """Under no_grad the cache is written in place; with grad it concatenates: same outputs, same cache."""
    torch.manual_seed(1)
    m = make()
    x = torch.randn(2, 40, D)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    chunks = [7] + [1] * 20 + [3, 10]
    with torch.no_grad():
        y_in_place, s_in_place = _decode(m, x, chunks, mask)
    y_cat, s_cat = _decode(m, x, chunks, mask)  # parameters require grad: the concatenating path
    assert s_in_place.capacity > s_in_place.length or isinstance(m, SlidingWindowAttention)
    assert s_cat.capacity == s_cat.length  # concatenation holds exactly the cached tokens
    assert (y_in_place - y_cat).abs().max() < 1e-6
    for name in ("k", "v", "positions", "keep"):
        assert torch.equal(getattr(s_in_place, name), getattr(s_cat, name))


def test_cache_grows_past_its_capacity_and_keeps_every_key():
    m = SoftmaxAttention(D, H, causal=True).eval()
    x = torch.randn(1, 70, D)
    with torch.no_grad():
        full, _ = m(x)
        state = m.init_state(1, "cpu", torch.float32)
        ys, caps = [], []
        for i in range(70):
            y, state = m(x[:, i : i + 1], state=state)
            ys.append(y)
            caps.append(state.capacity)
    assert caps[0] == 16 and caps[-1] == 128 and sorted(set(caps)) == [16, 32, 64, 128]  # doubling
    assert state.length == 70 and state.k.shape[2] == 70
    assert (torch.cat(ys, 1) - full).abs().max() < 1e-5


def test_select_after_growth_keeps_the_rows_and_decodes_on():
    m = SoftmaxAttention(D, H, causal=True).eval()
    x = torch.randn(3, 30, D)
    with torch.no_grad():
        full, _ = m(x)
        state = m.init_state(3, "cpu", torch.float32)
        _, state = m(x[:, :20], state=state)
        _, state = m(x[:, 20:21], state=state)  # grows 20 -> 40
        assert state.capacity == 40
        sub = state.select(torch.tensor([2, 0]))
        assert torch.equal(sub.k, state.k[[2, 0]]) and sub.length == 21 and sub.seen == 21
        ys = [m(x[[2, 0], i : i + 1], state=sub)[0] for i in range(21, 30)]
    assert (torch.cat(ys, 1) - full[[2, 0], 21:]).abs().max() < 1e-5
    assert state.length == 21  # the original state is untouched by decoding the selection


def test_select_drops_the_padding_flag_with_the_padded_rows():
    m = SoftmaxAttention(D, H, causal=True).eval()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        _, state = m(torch.randn(2, 6, D), mask=mask, state=m.init_state(2, "cpu", torch.float32))
    assert state.padded
    assert not state.select(torch.tensor([0])).padded and state.select(torch.tensor([1])).padded


@pytest.mark.parametrize("make", MIXERS, ids=["softmax", "sliding_window"])
def test_gradients_through_a_cached_forward_are_exact(make):
    """With grad enabled the cache keeps the graph: gradients of decoding == gradients of the full forward."""
    torch.manual_seed(2)
    m = make()
    x = torch.randn(2, 12, D)
    grads = []
    for chunks in ([12], [5, 1, 1, 1, 4]):
        xi = x.clone().requires_grad_(True)
        if chunks == [12]:
            y, _ = m(xi)
        else:
            y, _ = _decode(m, xi, chunks)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_cache_filled_without_grad_then_decoded_with_grad_backpropagates():
    """An in-place prefill followed by a recorded step: the step concatenates, backward runs and is exact."""
    m = SoftmaxAttention(D, H, causal=True)
    x = torch.randn(1, 9, D)
    state = m.init_state(1, "cpu", torch.float32)
    with torch.no_grad():
        _, state = m(x[:, :8], state=state)
    last = x[:, 8:].clone().requires_grad_(True)
    y, state = m(last, state=state)
    with torch.no_grad():  # a later in-place step must not disturb the tensors saved for backward
        m(torch.randn(1, 1, D), state=state)
    y.sum().backward()
    ref = x.clone().requires_grad_(True)
    m(ref)[0][:, 8:].sum().backward()
    assert (last.grad - ref.grad[:, 8:]).abs().max() < 1e-5


def test_logits_to_keep_equals_the_slice_of_the_full_logits():
    model = _lm(tie_embeddings=False)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False
    full = model(ids, mask=mask)
    for k in (1, 3, 10, 50):
        got = model(ids, mask=mask, logits_to_keep=k)
        assert got.shape == (2, min(k, 10), 64)
        assert (got - full[:, -min(k, 10) :]).abs().max() < 1e-6  # a matmul of fewer rows may round apart
    tied = _lm()
    assert (tied(ids, logits_to_keep=2) - tied(ids)[:, -2:]).abs().max() < 1e-6
    cache = model.new_cache(2)
    assert (model(ids, cache=cache, logits_to_keep=1) - model(ids)[:, -1:]).abs().max() < 1e-6
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad)


def test_generation_uses_the_in_place_cache_and_matches_recomputation():
    model = _lm(max_len=256)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [9, 8]]
    cached = model.generate(prompts, max_new_tokens=24)  # past the first capacity (16 -> 32 -> 64)
    recomputed = model.generate(prompts, max_new_tokens=24, use_cache=False)
    assert cached == recomputed
