"""Reformer LSH attention: limits that are exact, an independent construction of the bucket sets,
hashing determinism, the budget trend, bad options and the no-N x N property of the fast form."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.mixers.hashing import ReformerAttention
from tests.helpers import LargestTensor, rel_err, with_form

D, H = 32, 4


def _mixer(causal: bool, **opts) -> ReformerAttention:
    torch.manual_seed(0)
    return ReformerAttention(
        D, H, causal=causal, options={"n_buckets": 4, "n_hashes": 2, "chunk_size": 2, **opts}
    ).eval()


def _attend(m: ReformerAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Shared-QK softmax over ``allowed`` (b|1, h|1, n, n) minus self, self only where nothing else is left."""
    qk, k, v, _ = m._project(x, None)
    n = x.shape[1]
    others = allowed & ~torch.eye(n, dtype=torch.bool)
    lonely = ~others.any(-1, keepdim=True)
    use = torch.where(lonely, torch.eye(n, dtype=torch.bool).expand_as(others), others)
    p = (qk @ k.transpose(-1, -2)).masked_fill(~use, float("-inf")).softmax(-1)
    return m.out_proj(m.merge_heads(p @ v))


def _full(m, x):
    n = x.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool)
    return _attend(m, x, allowed.tril() if m.causal else allowed)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_bucket_and_one_chunk_is_full_attention_without_self(causal, n_hashes):
    m = _mixer(causal, n_buckets=1, n_hashes=n_hashes, chunk_size=16)
    x = torch.randn(2, 13, D)
    want = _full(m, x)
    for form in ("reference", "fast"):
        y, _ = with_form(m, form)(x)
        assert rel_err(want, y) < 1e-5, form
    # The first token of a causal sequence has nothing else to see, so it returns its own value.
    if causal:
        _, _, v, _ = m._project(x, None)
        assert torch.allclose(y[:, 0], m.out_proj(m.merge_heads(v))[:, 0], atol=1e-6)


def _sets_by_sorting(ids: torch.Tensor, chunk: int, causal: bool) -> torch.Tensor:
    """P_i^r built the long way: sort token lists by (bucket, position) in Python and cut into chunks."""
    b, h, r_, n = ids.shape
    sets = torch.zeros(b, h, r_, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for r in range(r_):
                bucket = ids[bi, hi, r].tolist()
                order = sorted(range(n), key=lambda i: (bucket[i], i))
                if causal:  # chunks restart at each bucket
                    chunk_of = {i: [j for j in order if bucket[j] == bucket[i]].index(i) // chunk for i in order}
                else:
                    chunk_of = {i: s // chunk for s, i in enumerate(order)}
                for i in range(n):
                    for j in range(n):
                        near = chunk_of[i] - chunk_of[j] in (0, 1)
                        sets[bi, hi, r, i, j] = bucket[i] == bucket[j] and near
    return sets


@pytest.mark.parametrize("causal", [False, True])
def test_rounds_combine_to_softmax_over_union_of_bucket_sets(causal):
    m = _mixer(causal, n_buckets=4, n_hashes=3, chunk_size=3)
    x = torch.randn(2, 17, D)
    _, _, _, ids = m._project(x, None)
    union = _sets_by_sorting(ids, 3, causal).any(dim=2)
    assert 0 < union.float().mean() < 0.9  # a real sparse pattern, neither trivial nor full
    want = _attend(m, x, union & torch.ones(17, 17, dtype=torch.bool).tril() if causal else union)
    for form in ("reference", "fast"):
        y, _ = with_form(m, form)(x)
        assert rel_err(want, y) < 1e-5, form


def test_hashing_is_deterministic_and_redraw_changes_buckets():
    m = _mixer(False, n_buckets=8, n_hashes=2)
    qk = torch.randn(2, H, 50, D // H)
    ids = m.buckets(qk)
    assert ids.shape == (2, H, 2, 50) and ids.min() >= 0 and ids.max() < 8
    assert torch.equal(ids, m.buckets(qk))
    assert len(ids.unique()) > 4  # the rotations spread tokens over the buckets
    x = torch.randn(1, 20, D)
    y, _ = m(x)
    torch.manual_seed(1)
    m.redraw_rotations()
    new = m.buckets(qk)
    assert (new != ids).float().mean() > 0.3
    assert not torch.allclose(m(x)[0], y)
    # Padded tokens go to the extra bucket whatever they contain.
    keep = torch.ones(2, 50, dtype=torch.bool)
    keep[:, 40:] = False
    assert (m.buckets(qk, keep)[..., 40:] == 8).all() and torch.equal(m.buckets(qk, keep)[..., :40], new[..., :40])


def test_rotations_are_saved_with_the_model():
    m = _mixer(False)
    assert "rotations" in m.state_dict()
    other = _mixer(False)
    torch.manual_seed(5)
    other.redraw_rotations()
    other.load_state_dict(m.state_dict())
    x = torch.randn(1, 11, D)
    assert torch.equal(m(x)[0], other(x)[0])


@pytest.mark.parametrize("causal", [False, True])
def test_error_to_full_attention_falls_as_the_budget_grows(causal):
    x = torch.randn(2, 32, D)
    # One bucket: the only budget is the chunk; a chunk covering the sequence is exact.
    errs = []
    for chunk in (2, 4, 8, 32):
        m = _mixer(causal, n_buckets=1, n_hashes=1, chunk_size=chunk)
        errs.append(rel_err(_full(m, x), m(x)[0]))
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-5, errs
    # More hash rounds (the first rounds drawn identically) only add keys to every token's set.
    errs = []
    for n_hashes in (1, 2, 4, 8):
        m = _mixer(causal, n_buckets=4, n_hashes=n_hashes, chunk_size=4)
        errs.append(rel_err(_full(m, x), m(x)[0]))
    assert errs[0] > errs[1] > errs[2] > errs[3], errs


@pytest.mark.parametrize("causal", [True, False])
def test_fast_form_never_materialises_n_by_n(causal):
    n = 512
    m = with_form(_mixer(causal, n_buckets=16, n_hashes=2, chunk_size=8), "fast")
    x = torch.randn(1, n, D)
    with torch.no_grad(), LargestTensor() as probe:
        m(x)
    assert probe.largest < H * n * n / 4
    with torch.no_grad(), LargestTensor() as probe:  # the probe does see the reference's N x N scores
        with_form(m, "reference")(x[:, :64])
    assert probe.largest >= H * 64 * 64


@pytest.mark.parametrize(
    "opts", [{"n_buckets": 3}, {"n_buckets": 0}, {"n_hashes": 0}, {"chunk_size": 0}, {"n_buckets": "many"}]
)
def test_bad_options_raise_config_error(opts):
    with pytest.raises(ConfigError, match="reformer"):
        ReformerAttention(D, H, options=opts)
