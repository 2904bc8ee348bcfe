"""Exact attention: fast (SDPA) == reference on every feature; padding == truncation; KV decode."""

from __future__ import annotations

import pytest
import torch

from efformer.mixers.softmax import SoftmaxAttention
from efformer.nn.positional import build_positional
from tests.helpers import WithPositional, rel_err, with_form

D, H = 32, 4


def _pair(causal, positional="none", **opts):
    pos = build_positional(positional, D, H, 256, causal)
    torch.manual_seed(0)
    if hasattr(pos, "mlp"):  # make FIRE's bias non-trivial
        for p in pos.parameters():
            torch.nn.init.normal_(p, std=0.5)
    if hasattr(pos, "table") and pos.kind == "bias":
        torch.nn.init.normal_(pos.table.weight)
    m = SoftmaxAttention(D, H, causal=causal, options=opts).eval()
    return WithPositional(m, pos) if pos.kind in ("rotary", "bias") else m


def _out_and_grads(m, x, mask):
    x = x.clone().requires_grad_(True)
    y, _ = m(x, mask=mask)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("positional", ["none", "rope", "xpos", "alibi", "t5", "fire"])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_equals_reference(causal, n_kv_heads, positional, padded):
    m = _pair(causal, positional, n_kv_heads=n_kv_heads, qk_norm=n_kv_heads == 2)
    for n in (1, 5, 17):
        x = torch.randn(3, n, D)
        mask = None
        if padded and n > 1:
            mask = torch.ones(3, n, dtype=torch.bool)
            mask[0, : n // 2] = False  # left padding (as a causal LM batch has)
            mask[1, n // 2 + 1 :] = False  # right padding (as an encoder batch has)
            mask[2, 1] = False  # a hole
        y_ref, g_ref = _out_and_grads(with_form(m, "reference"), x, mask)
        y, g = _out_and_grads(with_form(m, "fast"), x, mask)
        assert (y_ref - y).abs().max() < 1e-5
        for a, b in zip(g_ref, g, strict=True):
            assert (a - b).abs().max() < 1e-5


def test_reference_matches_hand_written_attention():
    m = _pair(False)
    x = torch.randn(2, 6, D)
    q = m.q_proj(x).view(2, 6, H, D // H).transpose(1, 2)
    k, v = m.kv_proj(x).view(2, 6, 2 * H, D // H).transpose(1, 2).chunk(2, dim=1)
    w = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
    expected = m.out_proj((w @ v).transpose(1, 2).reshape(2, 6, D))
    y, _ = with_form(m, "reference")(x)
    assert torch.allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_right_padding_equals_truncation(form):
    m = with_form(_pair(False, "rope"), form)
    x = torch.randn(1, 11, D)
    mask = torch.zeros(1, 11, dtype=torch.bool)
    mask[:, :7] = True
    y_pad, _ = m(x, mask=mask)
    y_cut, _ = m(x[:, :7])
    assert torch.allclose(y_pad[:, :7], y_cut, atol=1e-6)


@pytest.mark.parametrize("positional", ["none", "rope", "xpos", "alibi", "t5", "fire"])
def test_left_padded_decode_equals_unpadded(positional):
    """A left-padded row decoded with a KV cache equals the same tokens without padding."""
    m = _pair(True, positional)
    x = torch.randn(1, 9, D)
    pad = 4
    xp = torch.cat([torch.randn(1, pad, D), x], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    y_ref, _ = m(x)
    state = m.init_state(1, "cpu", torch.float32)
    y1, state = m(xp[:, : pad + 5], mask=mask[:, : pad + 5], state=state, positions=pos[:, : pad + 5])
    y2, state = m(xp[:, pad + 5 :], state=state, positions=pos[:, pad + 5 :])
    got = torch.cat([y1[:, pad:], y2], 1)
    assert rel_err(y_ref, got) < 1e-5


def test_kv_state_select_keeps_rows():
    m = _pair(True)
    state = m.init_state(3, "cpu", torch.float32)
    _, state = m(torch.randn(3, 4, D), state=state)
    sub = state.select(torch.tensor([2, 0]))
    assert torch.equal(sub.k, state.k[[2, 0]]) and sub.seen == state.seen == 4


def test_attention_dropout_only_in_training():
    m = SoftmaxAttention(D, H, causal=True, dropout=0.5)
    x = torch.randn(2, 8, D)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


def test_bad_kv_heads():
    from efformer.errors import ConfigError

    with pytest.raises(ConfigError, match="n_kv_heads"):
        SoftmaxAttention(D, H, options={"n_kv_heads": 3})
