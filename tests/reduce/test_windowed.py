"""Windowed merging in Swin stages: r = 0 is the plain model, no token merges across a window (or across the
wrap-round regions of a shifted one), every window loses r, the grid is whole again after each block, and
the refusals (r that would empty a window's half, other methods, the between placement, keep schedules)."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError
from efformer.models.factory import create_model
from efformer.reduce import ReduceError, Tokens, apply, combine, remove, unmerge
from efformer.reduce.windowed import window_assignment, window_cap, window_caps, window_slots
from efformer.registry import MIXERS


def swin_mixer(window: int, shift: int):
    return MIXERS.get("swin")(16, 2, causal=False, options={"window": window, "shift": shift}, dropout=0.0,
                              max_len=64)


def groups_ok(source: torch.Tensor, index: torch.Tensor, region: torch.Tensor) -> bool:
    """Every merged group (tokens with one source slot) lies inside one window and one region."""
    n = source.shape[1]
    win_of = torch.full((n,), -1, dtype=torch.long)
    reg_of = torch.full((n,), -1, dtype=torch.long)
    real = index >= 0
    win_of[index[real]] = torch.arange(index.shape[0])[:, None].expand_as(index)[real]
    reg_of[index[real]] = region[real]
    for row in source:
        for slot in row.unique():
            members = (row == slot).nonzero().flatten()
            if win_of[members].unique().numel() != 1 or reg_of[members].unique().numel() != 1:
                return False
    return True


@pytest.mark.parametrize("h,w,window,shift", [(8, 8, 4, 0), (8, 8, 4, 2), (7, 5, 3, 1), (3, 3, 4, 2)])
def test_window_slots_follow_the_mixers_own_pattern(h, w, window, shift):
    mixer = swin_mixer(window, shift)
    index, region = window_slots(mixer, h, w)
    allowed = mixer.allowed_pairs(h, w)  # (padded N, padded N) over the padded grid, the reference's mask
    _, _, _, _, hp, wp = mixer.layout(h, w)
    assert sorted(index[index >= 0].tolist()) == list(range(h * w))  # every real token in exactly one slot
    for win, reg in zip(index, region, strict=True):
        ids = win[win >= 0]
        padded = (ids // w) * wp + ids % w
        same = reg[win >= 0][:, None] == reg[win >= 0][None, :]
        assert torch.equal(allowed[padded][:, padded], same)  # same window and region == may attend


@pytest.mark.parametrize("h,w,window,shift,r", [(8, 8, 4, 0, 3), (8, 8, 4, 2, 8), (7, 5, 3, 1, 1), (9, 9, 3, 1, 2)])
def test_merges_stay_inside_one_window_and_region_and_every_window_loses_r(h, w, window, shift, r):
    torch.manual_seed(0)
    mixer = swin_mixer(window, shift)
    index, region = window_slots(mixer, h, w)
    assert r <= window_cap(index, region)
    x = torch.randn(2, h * w, 6)
    ar = torch.arange(h * w).expand(2, -1)
    tok, _ = combine(Tokens(x, torch.ones(2, h * w), None, ar.clone(), ar.clone()),
                     window_assignment(x, index, region, r))
    assert groups_ok(tok.source, index, region)
    assert tok.x.shape[1] == h * w - int(window_caps(index, region).clamp(max=r).sum())
    for row in tok.source:  # r fewer distinct tokens in every full window, at most its cap in an edge one
        for win, cap in zip(index, window_caps(index, region), strict=True):
            ids = win[win >= 0]
            assert row[ids].unique().numel() == ids.numel() - min(r, int(cap))
            assert int(cap) >= r or bool((win < 0).any())
    back = unmerge(tok.x, tok.source)  # the full grid; tokens nothing merged with come back exactly
    alone = torch.stack([(row[:, None] == row[None, :]).sum(1) == 1 for row in tok.source])
    assert back.shape == x.shape and torch.equal(back[alone], x[alone])
    for bi in range(2):  # a merged token is the mean of its group
        for slot in tok.source[bi].unique():
            members = tok.source[bi] == slot
            torch.testing.assert_close(back[bi, members], x[bi, members].mean(0).expand(int(members.sum()), -1))


def test_swin_model_r_zero_is_identical_and_every_block_gets_the_full_grid_back():
    torch.manual_seed(1)
    m = create_model("swin-tiny").eval()
    img = torch.rand(2, 3, 32, 32)
    y0 = m(img)
    red = apply(m, "tome", 0)
    assert torch.equal(m(img), y0)
    seen = {"attn": [], "ffn": []}
    for stage in m.stages:
        for blk in stage:
            blk.mixer.register_forward_hook(lambda mod, inp, out: seen["attn"].append(inp[0].shape[1]))
            blk.ffn.register_forward_hook(lambda mod, inp, out: seen["ffn"].append(inp[0].shape[1]))
    red = apply(m, "tome", 2)
    y = m(img)
    assert y.shape == y0.shape and not torch.equal(y, y0)
    # 16x16 / 8x8 / 4x4 grids in 4x4 windows (16, 4, 1 windows): each attention sees the whole grid, each
    # MLP the grid less 2 tokens per window
    assert seen["attn"] == [256, 256, 64, 64, 16, 16]
    assert seen["ffn"] == [256 - 32, 256 - 32, 64 - 8, 64 - 8, 16 - 2, 16 - 2]
    grids = [16, 16, 8, 8, 4, 4]
    blocks = [blk for stage in m.stages for blk in stage]
    assert len(red.last.sources) == 6
    for src, side, blk in zip(red.last.sources, grids, blocks, strict=True):
        assert groups_ok(src, *window_slots(blk.mixer, side, side))
    remove(m)
    assert torch.equal(m(img), y0)


def test_windowed_refusals_name_the_field_and_the_fix():
    m = create_model("swin-tiny").eval()
    img = torch.rand(1, 3, 32, 32)
    apply(m, "tome", 9)  # 4x4 windows: 8 even slots, each with partners, at most 8 per window
    with pytest.raises(ReduceError, match="lower r to <= 8") as e:
        m(img)
    assert e.value.field == "schedule.r"
    index, region = window_slots(swin_mixer(4, 1), 8, 8)  # shifted by 1: the corner window's regions hold
    assert window_caps(index, region).tolist() == [8, 8, 8, 6] and window_cap(index, region) == 6  # 9, 3, 3, 1
    with pytest.raises(CapabilityError, match="where='mid'"):
        apply(m, "tome", 2, where="between")
    with pytest.raises(CapabilityError, match="method='tome'"):
        apply(m, "pitome", 2)
    apply(m, "tome", {"keep": 0.5})
    with pytest.raises(ReduceError, match="per window"):
        m(img)
    apply(m, "tome", [1, 2, 0, 1, 2, 1])  # a per-point list: one value per block
    m(img)
    assert m.reducer.last.counts == [256, 256 - 16, 256 - 32, 64, 64, 60, 16, 14, 15]
