"""CLCA: at init (gate zero) it changes nothing, whatever the base method; the cache holds each point's class
token and the size-weighted mean of what the point removed; the head trains through the trainer and
resumes exactly; it wraps trainable methods too; what it cannot feed is refused."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError
from efformer.models.factory import create_model
from efformer.nn.positional import PositionalContext
from efformer.reduce import ReduceError, Tokens, apply, remove
from efformer.reduce.hook import TokenView

from .test_learned import _trainer, _weights, brightness, small_vit


@pytest.mark.parametrize("base", ["tome", "pitome", "mctf", "ltm", "ia_red2"])
def test_at_init_clca_is_exactly_its_base_method_and_keep_all_the_unreduced_model(base):
    torch.manual_seed(0)
    m = create_model("vit-tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    y0 = m(x)
    apply(m, "clca", 0, base=base, where="between")
    assert torch.equal(m(x), y0)
    torch.manual_seed(1)
    apply(m, base, 8, where="between")
    y_base = m(x)
    torch.manual_seed(1)
    red = apply(m, "clca", 8, base=base, where="between")
    if base in ("ltm", "ia_red2"):  # same modules: copy the base's weights in
        torch.manual_seed(1)
        apply(m, base, 8, where="between")
        state = {k: v.clone() for k, v in m.reduce_learned.state_dict().items()}
        y_base = m(x)
        red = apply(m, "clca", 8, base=base, where="between")
        m.reduce_learned.load_state_dict(state)
    assert torch.equal(m(x), y_base) and red.last.counts == [65, 57, 49, 41]
    remove(m)
    assert torch.equal(m(x), y0) and not hasattr(m, "reduce_cache")


def test_the_cache_holds_class_tokens_and_the_mean_of_what_each_point_removed():
    torch.manual_seed(0)
    m = create_model("vit-tiny").eval()
    outs = []
    hooks = [blk.register_forward_hook(lambda _m, _a, out: outs.append(out[0])) for blk in m.stages[0]]
    x = torch.rand(2, 3, 32, 32)
    red = apply(m, "clca", 8, where="between")  # 3 points between 4 blocks
    m(x)
    entries = dict(m.reduce_cache.entries)
    assert sorted(entries) == [0, 1, 2, 3, 4, 5]  # 3 class tokens, 3 removed-token means
    for i in range(3):
        assert torch.equal(entries[i], outs[i][:, 0])
    for h in hooks:
        h.remove()
    # the removed-token mean of one point, by hand: sizes 1..3, tome removes 5 of 17 tokens
    t = torch.randn(2, 17, 64)
    size = torch.randint(1, 4, (2, 17)).float()
    ar = torch.arange(17).expand(2, 17)
    view = TokenView(Tokens(t, size, None, ar.clone(), ar.clone()), None, 1, False, list(m.stages[0]), 1,
                     PositionalContext(ar))
    a = red.method.assign(view, 5)
    w = size * (a.dst != ar)
    assert ((a.dst != ar).sum(1) == 5).all()
    where, got = m.reduce_cache.entries[-1]
    assert where == 3 + 1 and torch.allclose(got, (t * w[..., None]).sum(1) / w.sum(1, keepdim=True), atol=1e-6)


def test_deit_feeds_both_heads_and_starts_exact():
    torch.manual_seed(0)
    m = create_model("deit-tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    apply(m, "tome", 8)
    y = m(x)
    apply(m, "clca", 8)
    assert torch.equal(m(x), y)
    with torch.no_grad():
        m.reduce_cache.gate.fill_(1.0)
    cls_logits, dist_logits = m(x, both_heads=True)
    remove(m)
    c0, d0 = m(x, both_heads=True)
    assert (cls_logits - c0).abs().max() > 1e-5 and (dist_logits - d0).abs().max() > 1e-5


def test_the_gate_opens_the_aggregation_and_gradients_reach_cache_head_and_backbone():
    torch.manual_seed(0)
    m = create_model("vit-tiny", n_classes=4)
    x = torch.rand(2, 3, 32, 32)
    apply(m, "clca", 8)
    y0 = m(x)
    with torch.no_grad():
        m.reduce_cache.gate.fill_(1.0)
    y = m(x)
    assert (y - y0).abs().max() > 1e-4
    y.square().sum().backward()
    for name in ("where", "query.weight", "out.weight", "gate"):
        assert m.reduce_cache.get_parameter(name).grad.abs().sum() > 0, name
    assert m.stages[0][0].mixer.qkv.weight.grad.abs().sum() > 0 if hasattr(m.stages[0][0].mixer, "qkv") else True


def _clca(base):
    torch.manual_seed(0)
    m = small_vit(n_classes=4)
    apply(m, "clca", 4, base=base)
    return m


@pytest.mark.slow
def test_clca_trains_through_the_trainer_and_the_loss_falls(tmp_path):
    tr = _trainer(_clca("tome"), tmp_path / "a", 20, brightness())
    tr.fit()
    losses = [h["loss"] for h in tr.history]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert tr.raw.reduce_cache.gate.abs().sum() > 0


def test_clca_around_a_trainable_method_resumes_exactly(tmp_path):
    data = brightness()
    full = _trainer(_clca("ltm"), tmp_path / "b", 6, data)
    full.fit()
    assert full.raw.reduce_cache.gate.abs().sum() > 0
    half = _trainer(_clca("ltm"), tmp_path / "c", 6, data)
    assert half.resume(full.ckpt_dir / "step_00000003")
    half.fit()
    ref, got = _weights(full.raw), _weights(half.raw)
    assert any(k.startswith("reduce_cache") for k in got) and any(k.startswith("reduce_learned") for k in got)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_clca_on_the_text_classifier_and_its_refusals():
    torch.manual_seed(0)
    m = create_model("classifier-tiny", n_layers=3, mixer="softmax", pooling="cls").eval()
    ids = torch.randint(1, 256, (2, 19))
    y0 = m(ids)
    apply(m, "clca", 0)
    assert torch.equal(m(ids), y0)
    with pytest.raises(CapabilityError, match="pooling='cls'"):
        apply(create_model("classifier-tiny", n_layers=3, mixer="softmax", pooling="mean"), "clca", 2)
    with pytest.raises(CapabilityError, match="widths"):
        apply(create_model("pvt-tiny", mixer="softmax", mixer_options={}, pooling="cls", class_token_stage="last"),
              "clca", 2)
    with pytest.raises(CapabilityError, match="causal"):
        apply(create_model("lm-tiny"), "clca", 2)
    with pytest.raises(ReduceError, match="clca.base"):
        apply(m, "clca", 2, base="nope")
    with pytest.raises(ReduceError, match="clca.base"):
        apply(m, "clca", 2, base="clca")
    with pytest.raises(ReduceError, match="tome.bogus"):
        apply(m, "clca", 2, base_options={"bogus": 1})
