"""Each method removes exactly r tokens, never the protected prefix, never lets padding into a real token,
and does what its paper says: PiToMe protects isolated tokens, Zero-TPrune keeps what attention ranks
highest, MCTF weighs size and informativeness, Token Transforming's modes are its special cases."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import UnknownNameError
from efformer.models.factory import create_model
from efformer.nn.positional import PositionalContext
from efformer.reduce import METHODS, ReduceError, Tokens, apply, combine, get_method
from efformer.reduce.hook import TokenView
from efformer.reduce.methods import PiToMe, TokenTransforming, ToMe, ZeroTPrune, weighted_pagerank


def view_of(x, size=None, mask=None, protected=1, qk=None, j=0, blocks=(None, None)) -> TokenView:
    """A TokenView over tokens x (b, t, d) with the given sizes, mask and (q, k)."""
    b, t = x.shape[:2]
    ar = torch.arange(t).expand(b, t)
    size = torch.ones(b, t) if size is None else size
    tok = Tokens(x, size, mask, ar.clone(), ar.clone())
    return TokenView(tok, qk, protected, False, list(blocks), j, PositionalContext(ar))


def qk_of(x, heads=2):
    b, t, d = x.shape
    q = x.view(b, t, heads, d // heads).transpose(1, 2)
    return q, q.clone()


ALL = list(METHODS)
# trainable methods (reduce.learned) need the modules apply() registers; tests/reduce/test_learned.py checks them
STANDALONE = [n for n in ALL if not hasattr(METHODS[n], "build")]


@pytest.mark.parametrize("method", STANDALONE)
@pytest.mark.parametrize("t,r,protected", [(2, 0, 1), (3, 1, 1), (17, 8, 1), (16, 7, 2), (31, 5, 1)])
def test_exactly_r_removed_and_the_protected_prefix_is_never_merged(method, t, r, protected):
    x = torch.randn(3, t, 8)
    x[:, :protected] = x[:, protected : protected + 1]  # a class token identical to a patch: still kept
    view = view_of(x, protected=protected, qk=qk_of(x), blocks=[None] * 4)
    if r == 0:
        return
    out, keep = combine(view.tok, get_method(method).assign(view, r))
    assert out.x.shape[1] == t - r
    assert torch.equal(keep[:, :protected], torch.arange(protected).expand(3, -1))
    assert torch.equal(out.x[:, :protected], x[:, :protected]) and (out.size[:, :protected] == 1).all()
    for p in range(protected):  # no other token goes into a protected one
        assert ((out.source == p).sum(1) == 1).all()


@pytest.mark.parametrize("method", STANDALONE)
def test_padding_never_adds_to_a_real_token(method):
    x = torch.randn(2, 20, 8)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    size = mask.float()
    x[1, 12:] = 100.0  # padding with large values: any leak shows
    view = view_of(x, size=size, mask=mask, qk=qk_of(x), blocks=[None] * 4)
    out, _ = combine(view.tok, get_method(method).assign(view, 6))
    real = out.mask
    assert (out.x[real].abs() < 50).all()
    kept = out.size.sum(1)
    assert kept[1] <= 12 and (out.size[~real] == 0).all()
    if method != "zero_tprune" and not (method == "token_transforming"):
        assert kept[1] == 12  # merging keeps every real token's mass; the padding went first
    assert real[1].sum() >= 12 - 6


def test_pitome_keeps_an_isolated_token_that_tome_merges():
    # tokens: class, a tight cluster, and one token far from all; r = a few: PiToMe merges inside the cluster
    torch.manual_seed(3)
    base = torch.randn(16)
    x = base + 0.05 * torch.randn(1, 12, 16)
    outlier = torch.randn(16)
    x[0, 3] = outlier
    x[0, 4] = outlier + 0.3 * torch.randn(16)  # its nearest neighbour, still far from the cluster
    view = view_of(x, blocks=[None] * 4)
    dst = PiToMe(margin=0.5).assign(view, 4).dst
    assert dst[0, 3] == 3 and dst[0, 4] == 4 and (dst[0] == 3).sum() == 1 and (dst[0] == 4).sum() == 1
    e = PiToMe(margin=0.5).energy(torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(
        x, dim=-1).transpose(1, 2), view)
    assert e[0, 3] < e[0, 5:].min()


def test_weighted_pagerank_is_the_stationary_importance():
    torch.manual_seed(4)
    a = torch.rand(1, 2, 6, 6).softmax(-1)
    s = weighted_pagerank(a, None, 200)
    mean = a.mean(1)[0]
    torch.testing.assert_close(mean.T @ s[0], s[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.sum(), torch.tensor(1.0))


def test_zero_tprune_prunes_the_tokens_nobody_attends_to():
    x = torch.randn(1, 9, 8)
    q = torch.zeros(1, 1, 9, 8)
    k = torch.zeros(1, 1, 9, 8)
    k[..., 0] = torch.tensor([5.0, 4, 0, 4, 4, 0, 4, 4, 4])  # tokens 2 and 5 get almost no attention
    q[..., 0] = 1.0
    view = view_of(x, qk=(q, k))
    a = ZeroTPrune(similarity_share=0.0).assign(view, 2)
    assert a.weight[0].tolist() == [1, 1, 0, 1, 1, 0, 1, 1, 1]
    out, _ = combine(view.tok, a)
    assert torch.equal(out.x[0], x[0, [0, 1, 3, 4, 6, 7, 8]])  # pruning is exact selection
    assert out.size[0].sum() == 7  # pruned tokens take their mass with them (weight 0)


def test_mctf_size_criterion_steers_merges_away_from_large_tokens():
    x = torch.randn(1, 7, 8)
    x[0, 2] = x[0, 1] + 1e-3  # 2 (A) is nearest to 1 (B) ...
    x[0, 4] = x[0, 1] + 2e-3  # and so is 4 (A)
    size = torch.tensor([[1.0, 50.0, 1, 1, 1, 1, 1]])  # ... but 1 is already a large token
    qk = qk_of(x)
    from efformer.reduce.methods import MCTF
    plain = MCTF(tau_size=0.0, tau_info=0.0).assign(view_of(x, size=size, qk=qk), 1).dst
    sized = MCTF(tau_size=4.0, tau_info=0.0).assign(view_of(x, size=size, qk=qk), 1).dst
    assert plain[0].tolist().count(1) == 2 and sized[0].tolist().count(1) == 1


def test_token_transforming_modes_are_pruning_and_merging():
    torch.manual_seed(5)
    x = torch.randn(2, 11, 8)
    qk = qk_of(x)
    view = view_of(x, qk=qk)
    pruned, _ = combine(view.tok, TokenTransforming(mode="prune").assign(view, 4))
    hard, _ = combine(view.tok, TokenTransforming(mode="hard").assign(view, 4))
    soft, _ = combine(view.tok, TokenTransforming(mode="soft").assign(view, 4))
    kept = TokenTransforming(mode="prune").assign(view, 4).weight.bool()
    assert torch.equal(pruned.x, x[kept].view(2, 7, 8))  # a selection matrix: exactly the kept tokens
    torch.testing.assert_close(hard.size.sum(1), torch.full((2,), 11.0))  # merging keeps the mass
    torch.testing.assert_close(soft.size.sum(1), torch.full((2,), 11.0))
    assert (soft.size > 1).sum() > (hard.size > 1).sum() or not torch.equal(soft.x, hard.x)
    # hard == merging the same tokens into their best kept token by size-weighted means
    a = TokenTransforming(mode="hard").assign(view, 4)
    from efformer.reduce import Assignment
    merged, _ = combine(view.tok, Assignment(_dst_from_matrix(a.matrix, kept)))
    torch.testing.assert_close(hard.x, merged.x)


def _dst_from_matrix(matrix, kept):
    kept_idx = [row.nonzero().flatten() for row in kept]
    return torch.stack([ki[matrix[b].argmax(0)] for b, ki in enumerate(kept_idx)])


@pytest.mark.parametrize("method", ALL)
def test_methods_run_in_models_and_backpropagate(method):
    m = create_model("vit-tiny")
    apply(m, method, 6)
    m(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in m.stages[0][0].parameters())


def test_unknown_method_and_bad_options_are_refused_by_name():
    with pytest.raises(UnknownNameError, match="tome"):
        get_method("tomee")
    with pytest.raises(ReduceError) as e:
        get_method("pitome", margin=3.0)
    assert e.value.field == "pitome.margin" and "margin" in str(e.value)
    with pytest.raises(ReduceError, match="options of 'tome'"):
        get_method("tome", r=3)
    assert isinstance(get_method(ToMe()), ToMe)
