"""Synthesizer: logits as the paper defines them, factorised rank vs expressiveness, fixed vs learned
random tables, absolute positions in decoding, and clear errors for bad options and long inputs."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.synthesizer import DenseSynthesizer, RandomSynthesizer
from tests.helpers import rel_err, with_form

D, H = 32, 4


def _dense(**opts) -> DenseSynthesizer:
    torch.manual_seed(0)
    return DenseSynthesizer(D, H, options=opts, max_len=24).eval()


def _random(causal=False, **opts) -> RandomSynthesizer:
    torch.manual_seed(0)
    return RandomSynthesizer(D, H, causal=causal, options=opts, max_len=24).eval()


def _by_hand(m, x, logits):
    """softmax(logits (b|1, h, n, n)) V(x), projected out."""
    v = m.split_heads(m.v_proj(x))
    return m.out_proj(m.merge_heads(logits.softmax(-1) @ v))


@pytest.mark.parametrize("form", ["reference", "fast"])
@pytest.mark.parametrize("factorized", [None, 6])
def test_dense_logits_are_each_tokens_mlp_output(form, factorized):
    m = with_form(_dense(factorized=factorized), form)
    x = torch.randn(2, 11, D)
    out = m.heads_out(torch.relu(m.hidden(x))).view(2, 11, H, -1).transpose(1, 2)  # (b, h, n, widths)
    if factorized is None:
        logits = out[..., :11]
    else:  # a (6) and c (24 / 6 = 4): logit of key p is a[p // 4] * c[p % 4]
        a, c = out[..., :6], out[..., 6:]
        logits = torch.stack([a[..., p // 4] * c[..., p % 4] for p in range(11)], dim=-1)
    assert rel_err(_by_hand(m, x, logits), m(x)[0]) < 1e-5


@pytest.mark.parametrize("form", ["reference", "fast"])
@pytest.mark.parametrize("causal", [False, True])
def test_random_attention_is_the_table_whatever_the_input(form, causal):
    m = with_form(_random(causal), form)
    x = torch.randn(2, 9, D)
    logits = m.matrix()[:, :9, :9]
    if causal:
        logits = logits.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    assert rel_err(_by_hand(m, x, logits[None]), m(x)[0]) < 1e-5


def test_factorised_rank_grows_so_does_what_it_can_represent():
    n = 24
    target = torch.randn(H, n, n) * 2
    u, s, vh = torch.linalg.svd(target)
    x = torch.randn(1, n, D)
    errs = []
    for k in (1, 4, 12, 24):
        m = _random(factorized=k)
        with torch.no_grad():  # the best rank-k factors of the target logits
            m.table0.copy_(u[..., :k] * s[:, None, :k].sqrt())
            m.table1.copy_(vh[:, :k].transpose(-1, -2) * s[:, None, :k].sqrt())
        errs.append(rel_err(_by_hand(m, x, target[None]), m(x)[0]))
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-5, errs


def test_fixed_random_table_is_a_saved_buffer_and_learned_one_trains():
    fixed, learned = _random(trainable=False), _random(trainable=True)
    assert "table0" in fixed.state_dict() and all("table" not in n for n, _ in fixed.named_parameters())
    assert torch.equal(fixed.table0, learned.table0)  # the same draw, one frozen, one learnable
    y, _ = learned(torch.randn(2, 7, D))
    y.square().sum().backward()
    assert learned.table0.grad[:, :7, :7].abs().sum() > 0 and (learned.table0.grad[:, 7:] == 0).all()


@pytest.mark.parametrize("cls", [DenseSynthesizer, RandomSynthesizer])
def test_logits_follow_absolute_positions(cls):
    torch.manual_seed(0)
    m = cls(D, H, causal=True, max_len=24).eval()
    x = torch.randn(1, 5, D)
    v = m.split_heads(m.v_proj(x))
    pos = torch.arange(10, 15)[None]
    logits = m.logits(x, pos, pos).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    want = m.out_proj(m.merge_heads(logits.softmax(-1) @ v))
    assert rel_err(want, m(x, positions=pos)[0]) < 1e-5
    assert not torch.allclose(want, m(x)[0])  # positions 0..4 read other logits


@pytest.mark.parametrize("cls", [DenseSynthesizer, RandomSynthesizer])
def test_inputs_beyond_max_len_are_refused(cls):
    torch.manual_seed(0)
    m = cls(D, H, causal=True, max_len=8).eval()
    m(torch.randn(1, 8, D))
    with pytest.raises(ShapeError, match="max_len=8"):
        m(torch.randn(1, 9, D))
    state = m.init_state(1, "cpu", torch.float32)
    _, state = m(torch.randn(1, 8, D), state=state)
    with pytest.raises(ShapeError, match="max_len=8"):
        m(torch.randn(1, 1, D), state=state)


def test_padded_keys_get_no_weight():
    m = _random()
    x = torch.randn(1, 6, D)
    keep = torch.tensor([[True, True, False, True, False, True]])
    logits = m.matrix()[:, :6, :6].masked_fill(~keep[:, None, None, :], float("-inf"))
    want = _by_hand(m, x, logits) * keep[..., None]
    for form in ("reference", "fast"):
        assert rel_err(want, with_form(m, form)(x, mask=keep)[0]) < 1e-5


@pytest.mark.parametrize(
    "cls,opts",
    [
        (DenseSynthesizer, {"factorized": 5}),  # does not divide max_len=24
        (DenseSynthesizer, {"factorized": 0}),
        (DenseSynthesizer, {"max_len": 0}),  # not an option: the constructor's argument
        (RandomSynthesizer, {"factorized": 25}),  # rank above max_len=24
        (RandomSynthesizer, {"factorized": 0}),
        (RandomSynthesizer, {"trainable": "maybe"}),
    ],
)
def test_bad_options_raise_config_error(cls, opts):
    opts = dict(opts)
    max_len = opts.pop("max_len", 24)
    with pytest.raises(ConfigError, match=f"{cls.name}|max_len"):
        cls(D, H, options=opts, max_len=max_len)
