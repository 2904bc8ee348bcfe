"""apply/remove on every kind of encoder, and the refusals: causal models, mixers that take no score bias,
2-D grid mixers, methods that need an attention map on mixers that form none."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, EfformerError
from efformer.models.factory import create_model
from efformer.reduce import apply, remove


def test_causal_language_models_are_refused_with_the_reason():
    with pytest.raises(CapabilityError, match="breaks causality"):
        apply(create_model("lm-tiny"), "tome", 4)
    with pytest.raises(CapabilityError, match="causality breaks"):
        apply(create_model("classifier-tiny", encoder_causal=True, mixer="softmax"), "tome", 4)


def test_mixers_without_a_score_bias_are_refused_unless_proportional_attention_is_off():
    m = create_model("classifier-tiny", mixer="linear", n_layers=3)
    with pytest.raises(CapabilityError, match="prop_attn=False") as e:
        apply(m, "tome", 2)
    assert "'linear'" in str(e.value) and "additive score bias" in str(e.value)
    apply(m, "tome", 2, prop_attn=False)  # the tokens themselves are the metric
    ids = torch.randint(0, 256, (2, 19))
    assert m(ids).shape == (2, 2)
    with pytest.raises(CapabilityError, match="attention map"):
        apply(m, "zero_tprune", 2, prop_attn=False)


def test_grid_mixers_are_refused_and_pyramids_of_1d_mixers_unmerge_before_each_stage():
    with pytest.raises(CapabilityError, match="2-D grid"):
        apply(create_model("pvt-tiny"), "tome", 2)  # spatial-reduction attention: no windows to merge in
    m = create_model("pvt-tiny", mixer="softmax", mixer_options={}).eval()
    img = torch.rand(2, 3, 32, 32)
    y0 = m(img)
    red = apply(m, "tome", 0)
    assert torch.equal(m(img), y0)
    red = apply(m, "tome", 8, where="between")
    y = m(img)
    # three stages of 2 blocks on 16x16, 8x8, 4x4 grids: one point each, the full grid before each merge
    assert red.last.counts == [256, 248, 64, 56, 16, 8] and y.shape == y0.shape
    assert red.last.source.shape == (2, 16)
    red = apply(m, "tome", 4)  # mid: two points per stage (4x4: 16 -> 12 -> 8)
    assert m(img).shape == y0.shape and red.last.counts == [256, 252, 248, 64, 60, 56, 16, 12, 8]
    with pytest.raises(EfformerError, match="one value per reduction point: this model has 3"):
        apply(m, "tome", [1, 2], where="between")
        m(img)
    apply(m, "tome", [4, 0, 2], where="between")
    m(img)
    assert red.last.counts != m.reducer.last.counts


def test_text_encoders_with_bias_and_rotary_positions_and_the_dual_encoder():
    ids = torch.randint(0, 256, (2, 31))
    for overrides in ({"positional": "alibi", "pooling": "cls"}, {"positional": "rope", "pooling": "cls"},
                      {"positional": "sinusoidal", "pooling": "mean"}):
        m = create_model("classifier-tiny", n_layers=3, mixer="softmax", **overrides).eval()
        y0 = m(ids)
        n = 31 + (overrides["pooling"] == "cls")
        for where, counts in (("between", [n, n - 5, n - 10]), ("mid", [n, n - 5, n - 10, n - 15])):
            red = apply(m, "tome", 5, where=where)
            y = m(ids)
            assert red.last.counts == counts and y.shape == y0.shape and not torch.equal(y, y0)
            remove(m)
            assert torch.equal(m(ids), y0)
    d = create_model("dual-tiny", n_layers=3).eval()
    apply(d, "pitome", 3)
    assert d(ids, ids.flip(1)).shape == (2, 2)


def test_mean_pooling_of_the_unmerged_tokens_is_the_size_weighted_mean():
    m = create_model("classifier-tiny", n_layers=3, pooling="mean").eval()
    ids = torch.randint(0, 256, (2, 20))
    red = apply(m, "tome", 6, where="between")
    h = {}
    m.backbone.final_norm.register_forward_hook(lambda mod, inp, out: h.setdefault("full", out))
    m(ids)
    full, size, src = h["full"], red.last.size, red.last.source
    assert full.shape == (2, 20, 64) and size.shape == (2, 8)
    for b in range(2):  # every input token carries its merged token: equal rows inside each source group
        for slot in range(8):
            rows = full[b, src[b] == slot]
            assert rows.shape[0] == int(size[b, slot]) and torch.allclose(rows, rows[:1].expand_as(rows))


def test_xcit_local_patch_interaction_is_refused_before_any_change():
    m = create_model("xcit-tiny").eval()
    img = torch.rand(1, 3, 32, 32)
    y0 = m(img)
    with pytest.raises(CapabilityError, match="local patch interaction"):
        apply(m, "tome", 2)
    assert torch.equal(m(img), y0)  # nothing was installed


def test_cpe_early_exit_and_non_encoders_are_refused():
    with pytest.raises(CapabilityError, match="cpe"):
        apply(create_model("vit-tiny", positional="cpe"), "tome", 2)
    with pytest.raises(CapabilityError, match="exit_layers"):
        apply(create_model("classifier-tiny", exit_layers=[0]), "tome", 2)
    with pytest.raises(CapabilityError, match="needs an efformer encoder"):
        apply(torch.nn.Linear(2, 2), "tome", 2)


def test_only_blocks_before_a_reduction_point_record_their_keys_and_the_hook_clears_them():
    m = create_model("vit-tiny").eval()
    mixers = [blk.mixer for blk in m.stages[0]]
    for where, recording in (("between", [True, True, True, False]), ("mid", [True] * 4)):
        apply(m, "tome", 4, where=where)
        m(torch.rand(1, 3, 32, 32))
        assert [x.record_qk for x in mixers] == recording
        assert all(getattr(x, "last_qk", None) is None for x in mixers)
    remove(m)
    assert not any(x.record_qk for x in mixers)
