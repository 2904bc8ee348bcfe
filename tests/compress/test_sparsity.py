"""Sparsity masks (magnitude, Wanda; unstructured, 2:4, blocks) and SCAP-style activation thresholds."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.compress import SparsityConfig, calibrate_activation_sparsity, sparsify
from efformer.compress.sparsity import block_mask, nm_mask, unstructured_mask, wanda_score
from efformer.errors import EfformerError


def tiny():
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=64, n_layers=2, ffn_mult=3.0)


def calib(n=4, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_2_4_mask_keeps_exactly_two_of_every_four_and_the_largest():
    score = torch.randn(7, 36).abs()
    keep = nm_mask(score)
    assert (keep.reshape(7, 9, 4).sum(-1) == 2).all()
    kept_min = torch.where(keep, score, torch.inf).reshape(7, 9, 4).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, score).reshape(7, 9, 4).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_unstructured_mask_drops_the_lowest_per_row():
    score = torch.randn(5, 13).abs()
    keep = unstructured_mask(score, 0.3)
    assert (keep.sum(1) == 13 - 4).all()  # round(0.3 * 13) = 4 per row
    for r in range(5):
        assert score[r][keep[r]].min() >= score[r][~keep[r]].max()


def test_block_mask_drops_whole_tiles_including_partial_edges():
    score = torch.rand(10, 13)
    keep = block_mask(score, 0.5, (4, 4))  # 3 x 4 tiles, the last row/column of tiles partial
    tiles = torch.nn.functional.pad(keep.float(), (0, 3, 0, 2), value=-1).reshape(3, 4, 4, 4)
    for i in range(3):
        for j in range(4):
            t = tiles[i, :, j, :]
            vals = t[t >= 0]
            assert vals.min() == vals.max()  # a tile is kept or dropped whole
    assert int((tiles[:, 0, :, 0] == 0).sum()) == 6  # half of the 12 tiles


def test_wanda_keeps_weights_on_loud_inputs():
    w = torch.ones(3, 8)
    sq = torch.ones(8)
    sq[5] = 100.0  # one input channel with a large norm
    keep = unstructured_mask(wanda_score(w, sq), 0.875)
    assert keep[:, 5].all() and keep.sum() == 3
    # with equal input norms Wanda is magnitude pruning
    w = torch.randn(6, 16)
    torch.testing.assert_close(unstructured_mask(wanda_score(w, torch.full((16,), 3.0)), 0.5),
                               unstructured_mask(w.abs(), 0.5))


@pytest.mark.parametrize("pattern", ["unstructured", "block"])
def test_zero_sparsity_is_identity(pattern):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    achieved = sparsify(model, SparsityConfig(pattern=pattern, sparsity=0.0))
    assert set(achieved.values()) == {0.0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsify_model_2_4_and_half(method):
    model = tiny()
    x = calib(2, 16)
    ref = model(x)
    achieved = sparsify(model, SparsityConfig(method=method, pattern="nm"), calibration=calib())
    assert achieved and all(v == 0.5 for v in achieved.values())
    for name, mod in model.named_modules():
        if name in achieved:
            assert ((mod.weight != 0).reshape(mod.out_features, -1, 4).sum(-1) == 2).all()
    out = model(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_wanda_beats_magnitude_on_the_calibration_outputs():
    x = calib(4, 32)
    ref = tiny()(x).detach()
    errs = {}
    for method in ("magnitude", "wanda"):
        model = tiny()
        sparsify(model, SparsityConfig(method=method, sparsity=0.5), calibration=x)
        errs[method] = float((model(x).detach() - ref).norm())
    assert errs["wanda"] < errs["magnitude"]


@pytest.mark.parametrize("kw,calibration,message", [
    (dict(sparsity=1.0), None, "sparsity"),
    (dict(sparsity=-0.1), None, "sparsity"),
    (dict(method="wanda"), None, "wanda needs calibration"),
    (dict(method="wanda"), torch.zeros(2, 4), "LongTensor"),
    (dict(pattern="nm", n=4, m=4), None, "below m"),
    (dict(pattern="nm", m=5), None, "multiple of m=5"),
    (dict(pattern="block", block=(0, 4)), None, "positive sides"),
])
def test_bad_input_is_refused_and_the_model_is_untouched(kw, calibration, message):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EfformerError, match=message):
        sparsify(model, SparsityConfig(**kw), calibration=calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_activation_thresholds_hit_the_target_and_come_off():
    model = tiny()
    x = calib(4, 32)
    ref = model(x)
    for target in (0.3, 0.7):
        act = calibrate_activation_sparsity(model, x, target)
        assert set(act.thresholds) == {n for n, m in model.named_modules() if ".ffn." in f".{n}"
                                       and isinstance(m, torch.nn.Linear)}
        out = model(x)
        for name, reached in act.achieved().items():
            assert reached == pytest.approx(target, abs=0.02), name  # on the calibration windows themselves
        held = calib(4, 32, seed=7)
        act.reset()
        model(held)
        assert all(abs(v - target) < 0.1 for v in act.achieved().values())
        assert not torch.equal(out, ref)
        act.remove()
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(EfformerError, match="target"):
        calibrate_activation_sparsity(model, x, 1.0)
    with pytest.raises(EfformerError, match="calibration"):
        calibrate_activation_sparsity(model, None, 0.5)
