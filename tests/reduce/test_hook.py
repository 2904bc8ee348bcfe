"""The reduction hook's invariants: schedules and their token counts, size-weighted merging, proportional
attention, unmerge, Token Transforming's matrix, and r = 0 leaving every model exactly as it was."""

from __future__ import annotations

import pytest
import torch

from efformer.models.factory import create_model
from efformer.nn.positional import PositionalContext
from efformer.reduce import (
    Assignment,
    LogSizeBias,
    ReduceError,
    Schedule,
    Tokens,
    apply,
    combine,
    remove,
    transform_tokens,
    unmerge,
)
from efformer.reduce.hook import as_schedule
from efformer.reduce.methods import ToMe
from efformer.registry import MIXERS


def tokens(x: torch.Tensor, size: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> Tokens:
    b, n = x.shape[:2]
    ar = torch.arange(n).expand(b, n)
    return Tokens(x, torch.ones(b, n) if size is None else size, mask, ar.clone(), ar.clone())


# ---- schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,r,where,counts", [
    ("vit-tiny", 8, "between", [65, 57, 49, 41]),  # 8 x 8 patches + class token, 4 blocks: 3 points between
    ("vit-tiny", 16, "between", [65, 49, 33, 17]),
    ("vit-tiny", 40, "between", [65, 33, 17, 9]),  # capped at (t - 1) // 2 per point, as ToMe caps
    ("deit-tiny", 8, "between", [66, 58, 50, 42]),
    ("deit-tiny", 40, "between", [66, 34, 18, 10]),  # class and distillation tokens protected: (t - 2) // 2
    ("vit-tiny", 8, "mid", [65, 57, 49, 41, 33]),  # ToMe's placement: a point inside each of the 4 blocks
    ("vit-tiny", 40, "mid", [65, 33, 17, 9, 5]),
    ("deit-tiny", 8, "mid", [66, 58, 50, 42, 34]),
])
def test_token_counts_follow_the_schedule(preset, r, where, counts):
    m = create_model(preset).eval()
    red = apply(m, "tome", r, where=where)
    m(torch.rand(2, 3, 32, 32))
    assert red.last.counts == counts and red.points == len(counts) - 1


def test_mid_placement_runs_each_ffn_on_the_tokens_merged_after_its_attention():
    m = create_model("vit-tiny").eval()
    seen = {"attn": [], "ffn": []}
    for blk in m.stages[0]:
        blk.mixer.register_forward_hook(lambda mod, inp, out: seen["attn"].append(inp[0].shape[1]))
        blk.ffn.register_forward_hook(lambda mod, inp, out: seen["ffn"].append(inp[0].shape[1]))
    apply(m, "tome", 8)  # default: where="mid", as ToMe
    m(torch.rand(2, 3, 32, 32))
    assert seen["attn"] == [65, 57, 49, 41] and seen["ffn"] == [57, 49, 41, 33]
    seen["attn"].clear(), seen["ffn"].clear()
    apply(m, "tome", 8, where="between")
    m(torch.rand(2, 3, 32, 32))
    assert seen["attn"] == seen["ffn"] == [65, 57, 49, 41]
    remove(m)
    assert all(blk.reduce_mid is None for blk in m.stages[0])
    with pytest.raises(ReduceError, match="where"):
        apply(m, "tome", 8, where="inside")


def test_decreasing_keep_and_list_schedules():
    assert Schedule(r=16, inflect=-1).per_point(65, 3, 1) == [32, 16, 0]  # ToMe's parse_r: 2r -> 0
    assert Schedule(r=[3, 0, 5]).per_point(65, 3, 1) == [3, 0, 5]
    rs = Schedule(keep=0.25).per_point(65, 3, 1)
    assert 65 - sum(rs) == round(0.25 * 65) and rs[0] <= 32 and rs[1] <= (65 - rs[0] - 1) // 2
    m = create_model("vit-tiny").eval()
    red = apply(m, "tome", {"keep": 0.5})
    m(torch.rand(1, 3, 32, 32))
    assert red.last.counts[-1] == round(0.5 * 65)


def test_tome_decreasing_schedule_matches_parse_r_on_vit_b():
    # ToMe's README example: ViT-B/16 (12 layers), r = 16 decreasing: 32, 29, 26, ..., 2, 0
    got = Schedule(r=16, inflect=-1).per_point(10_000, 12, 1)
    assert got == [int(32 - 32 / 11 * i) for i in range(12)] and got[0] == 32 and got[-1] == 0


def test_constant_schedule_gives_vit_b_token_counts():
    # 197 tokens, r = 16 over 12 points: 197 -> 181 -> ... -> 21 -> 11 (the last point capped at 10)
    rs = Schedule(r=16).per_point(197, 12, 1)
    counts = [197]
    for r in rs:
        counts.append(counts[-1] - r)
    assert counts[1] == 181 and counts[-2] == 21 and counts[-1] == 11


@pytest.mark.parametrize("bad,field", [
    ({"r": [40, 0, 0]}, "schedule.r[0]"),  # more than (65 - 1) // 2 at the first point
    ({"r": [30, 30, 30]}, "schedule.r[1]"),  # the second point would leave less than one token per pair
    ({"r": [1, 2]}, "schedule.r"),  # one value per reduction point (3 in vit-tiny)
    ({"keep": 0.01}, "schedule.keep"),  # 1 token out of 65 cannot be reached in 3 halvings
])
def test_schedules_that_cannot_run_are_refused(bad, field):
    m = create_model("vit-tiny").eval()
    apply(m, "tome", bad, where="between")
    with pytest.raises(ReduceError) as e:
        m(torch.rand(1, 3, 32, 32))
    assert e.value.field == field and any(fix in str(e.value) for fix in ("lower it", "raise keep", "give that many"))


@pytest.mark.parametrize("bad", [-1, [2, -1, 0], {"r": 2, "keep": 0.5}, {}, "eight", True, {"keep": 0.0}])
def test_bad_schedule_values_are_refused(bad):
    with pytest.raises(ReduceError) as e:
        as_schedule(bad)
    assert e.value.field == "schedule"


# ---- merging -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 7])
def test_merging_k_identical_tokens_gives_that_token_with_size_k(k):
    x = torch.randn(2, 10, 5)
    x[:, 1 : 1 + k] = x[:, 1:2]
    dst = torch.arange(10).expand(2, 10).clone()
    dst[:, 2 : 1 + k] = 1
    out, keep = combine(tokens(x), Assignment(dst))
    assert out.x.shape[1] == 10 - (k - 1)
    torch.testing.assert_close(out.x[:, 1], x[:, 1], rtol=1e-6, atol=1e-7)
    assert torch.equal(out.size[:, 1], torch.full((2,), float(k)))
    assert torch.equal(out.x[:, 0], x[:, 0]) and torch.equal(out.x[:, 2:], x[:, 1 + k :])  # others untouched


def test_merge_is_the_size_weighted_mean_and_sizes_add():
    x, size = torch.randn(1, 4, 3), torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out, _ = combine(tokens(x, size), Assignment(torch.tensor([[0, 1, 1, 1]])))
    torch.testing.assert_close(out.x[0, 1], (2 * x[0, 1] + 3 * x[0, 2] + 4 * x[0, 3]) / 9)
    assert out.size.tolist() == [[1.0, 9.0]]


def test_tome_merges_the_duplicate_pair_first():
    x = torch.randn(1, 9, 16)
    x[0, 4] = x[0, 7]  # A token 4 (even) duplicates B token 7 (odd)
    from tests.reduce.test_methods import view_of
    out, _ = combine(tokens(x), ToMe().assign(view_of(x), 1))
    assert out.x.shape[1] == 8 and out.size[0].tolist().count(2.0) == 1
    assert out.source[0, 4] == out.source[0, 7]


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_proportional_attention_over_a_merged_token_equals_attention_over_its_copies(form):
    torch.manual_seed(1)
    attn = MIXERS.get("softmax")(16, 4, options={"form": form}).eval()
    u = torch.randn(2, 6, 16)
    copies = [3, 1, 2, 1, 4, 1]  # token i appears copies[i] times
    dup = torch.cat([u[:, i : i + 1].expand(-1, c, -1) for i, c in enumerate(copies)], 1)
    y_dup, _ = attn(dup)
    size = torch.tensor([copies], dtype=torch.float).expand(2, -1)
    pos = torch.arange(6).expand(2, 6)
    ctx = PositionalContext(pos, bias=LogSizeBias(None, size.log()))
    y_merged, _ = attn(u, positions=ctx)
    first = torch.tensor([0, *torch.tensor(copies).cumsum(0)[:-1].tolist()])
    torch.testing.assert_close(y_merged, y_dup[:, first], rtol=1e-5, atol=1e-6)
    y_plain, _ = attn(u)  # without the log-size bias the copies' weight is lost: the test can fail
    assert (y_plain - y_dup[:, first]).abs().max() > 1e-3


def test_whole_model_with_exact_duplicates_is_unchanged_by_merging_them():
    # No positions and an image made of 4 patch kinds: many tokens are identical in every layer, ToMe merges
    # identical pairs (cosine 1) and proportional attention keeps the model's output exactly.
    torch.manual_seed(2)
    m = create_model("vit-tiny", positional="none").eval()
    kinds = torch.rand(4, 3, 4, 4)
    pick = torch.randint(0, 4, (8, 8))
    img = kinds[pick].permute(2, 0, 3, 1, 4).reshape(1, 3, 32, 32)
    y0 = m(img)
    for where, counts in (("mid", [65, 61, 57, 53, 49]), ("between", [65, 61, 57, 53])):
        red = apply(m, "tome", 4, where=where)
        y = m(img)
        assert red.last.counts == counts
        torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-5)
        apply(m, "tome", 4, prop_attn=False, where=where)
        assert (m(img) - y0).abs().max() > 1e-4  # without the bias the merged copies count once


# ---- unmerge -----------------------------------------------------------------------------------------
def test_unmerge_restores_the_grid_and_the_tokens_nothing_merged_into():
    from tests.reduce.test_methods import view_of
    x = torch.randn(3, 17, 8)
    tok = tokens(x)
    for r in (4, 3, 2):
        tok, _ = combine(tok, ToMe().assign(view_of(tok.x, size=tok.size), r))
    full = unmerge(tok.x, tok.source)
    assert full.shape == x.shape
    alone = tok.size.gather(1, tok.source) == 1  # input tokens whose final token holds only themselves
    assert alone.any() and (~alone).any()
    assert torch.equal(full[alone], x[alone])
    # a merged token is the size-weighted mean of its sources
    for b in range(3):
        for slot in range(tok.x.shape[1]):
            torch.testing.assert_close(tok.x[b, slot], x[b, tok.source[b] == slot].mean(0), rtol=1e-5, atol=1e-6)


def test_unmerge_refuses_a_foreign_source():
    with pytest.raises(Exception, match="reducer.last.source"):
        unmerge(torch.randn(1, 3, 2), torch.tensor([[0, 5]]))


# ---- Token Transforming's matrix -----------------------------------------------------------------------
def test_selection_and_permutation_matrices_are_pruning_and_reordering_exactly():
    x, size = torch.randn(2, 7, 5), torch.rand(2, 7) + 0.5
    keep = torch.tensor([[0, 2, 3, 6], [0, 1, 4, 5]])
    sel = torch.zeros(2, 4, 7).scatter(2, keep[..., None], 1.0)
    out, new_size, _ = transform_tokens(x, size, sel)
    assert torch.equal(out, x.gather(1, keep[..., None].expand(-1, -1, 5)))
    assert torch.equal(new_size, size.gather(1, keep))
    perm = torch.stack([torch.randperm(7) for _ in range(2)])
    pm = torch.zeros(2, 7, 7).scatter(2, perm[..., None], 1.0)
    assert torch.equal(transform_tokens(x, size, pm)[0], x.gather(1, perm[..., None].expand(-1, -1, 5)))


def test_a_one_hot_column_matrix_is_size_weighted_merging():
    x, size = torch.randn(1, 5, 4), torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0]])
    dst = torch.tensor([[0, 1, 1, 3, 3]])
    merged, _ = combine(tokens(x, size), Assignment(dst))
    m = torch.zeros(1, 3, 5).scatter(1, torch.tensor([[[0, 1, 1, 2, 2]]]), 1.0)
    out, new_size, _ = transform_tokens(x, size, m)
    torch.testing.assert_close(out, merged.x)
    assert torch.equal(new_size, merged.size)


def test_transform_matrix_shape_and_sign_are_checked():
    from efformer.errors import ShapeError
    with pytest.raises(ShapeError, match="matrix must be"):
        transform_tokens(torch.randn(1, 4, 2), torch.ones(1, 4), torch.ones(1, 2, 3))
    with pytest.raises(ShapeError, match=">= 0"):
        transform_tokens(torch.randn(1, 4, 2), torch.ones(1, 4), -torch.ones(1, 2, 4))


# ---- r = 0 and remove() ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune", "mctf", "token_transforming"])
@pytest.mark.parametrize("preset", ["vit-tiny", "deit-tiny", "classifier"])
def test_r_zero_is_the_unmodified_model_exactly(method, preset):
    if preset == "classifier":
        m = create_model("classifier-tiny", pooling="cls", n_layers=3).eval()
        ids, mask = torch.randint(0, 256, (2, 23)), torch.ones(2, 23, dtype=torch.bool)
        mask[1, 17:] = False

        def run():
            return m(ids, mask=mask)
    else:
        m = create_model(preset).eval()
        img = torch.rand(2, 3, 32, 32)

        def run():
            return m(img)
    y0 = run()
    apply(m, method, 0)
    assert torch.equal(run(), y0)
    apply(m, method, 4)
    assert not torch.equal(run(), y0)
    remove(m)
    assert torch.equal(run(), y0)


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich", "peri", "res_post", "deepnorm"])
def test_the_mid_hook_sits_between_the_two_residuals_of_every_norm_placement(placement):
    m = create_model("classifier-tiny", n_layers=2, pooling="cls", norm_placement=placement).eval()
    ids = torch.randint(0, 256, (2, 21))
    y0 = m(ids)
    apply(m, "tome", 0)
    assert torch.equal(m(ids), y0)
    seen = []
    m.backbone.blocks[0].ffn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    red = apply(m, "tome", 5)
    y = m(ids)
    assert seen == [22 - 5] and red.last.counts == [22, 17, 12] and y.shape == y0.shape
    remove(m)
    assert torch.equal(m(ids), y0)
