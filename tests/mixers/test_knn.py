"""IceFormer: k = N with a covering probe == softmax, error falls as k and the probe grow, the lift ranks
keys by inner product, softmax checkpoints load unchanged, bounded memory, bad options."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.registry import MIXERS
from tests.helpers import (
    assert_equals_softmax_under_rope,
    assert_forms_agree,
    make_mixer,
    rel_err,
    softmax_twin_of,
    with_form,
)
from tests.mixers.test_local import assert_no_dense_matrix

DIRECTIONS = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


def _ice(causal, **options):
    return make_mixer("iceformer", causal, max_len=64, **options)


@DIRECTIONS
@pytest.mark.parametrize("metric", ["inner_product", "cosine"])
@pytest.mark.parametrize("block", [4, 11, 64])
def test_k_equal_to_n_with_a_covering_probe_is_softmax(causal, block, metric):
    n = 11
    m = _ice(causal, top_k=n, probe=32, index_block=block, metric=metric)
    assert_equals_softmax_under_rope(m, n, seed=4)


def _mean_error(n: int, seeds: int = 4, causal: bool = False, **options) -> float:
    """Mean relative error to softmax; queries scaled up so attention is peaked, as in a trained model
    (with the near-uniform attention of a fresh layer no small set of keys carries the mass)."""
    total = 0.0
    for seed in range(seeds):
        m = _ice(causal, **options)
        with torch.no_grad():
            m.q_proj.weight.mul_(6.0)
        x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(seed))
        total += rel_err(softmax_twin_of(m)(x)[0], with_form(m, "fast")(x)[0])
    return total / seeds


@DIRECTIONS
def test_error_falls_as_k_grows(causal):
    errs = [_mean_error(32, causal=causal, top_k=k, probe=32, index_block=32) for k in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-5


@pytest.mark.parametrize("metric", ["inner_product", "cosine"])
def test_error_falls_as_the_search_probes_more(metric):
    """Fixed k: a wider probe retrieves more of the true top-k, so the output gets closer to softmax."""
    errs = [_mean_error(64, top_k=8, probe=p, n_projections=2, index_block=64, metric=metric) for p in (1, 2, 4, 8, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_the_lift_ranks_keys_by_inner_product():
    """After the lift, the key nearest the query is the one with the largest q . k (MIPS == NN)."""
    m = _ice(False, index_block=64)
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 40, 8) * torch.rand(1, 1, 40, 1) * 3
    kn2 = k.square().sum(-1)
    kx = torch.cat([k, (kn2.max() - kn2).sqrt()[..., None]], -1)
    qx = torch.cat([q * kn2.max().sqrt() / q.norm(dim=-1, keepdim=True), torch.zeros(1, 1, 5, 1)], -1)
    nearest = torch.cdist(qx[0, 0], kx[0, 0]).argmin(-1)
    assert torch.equal(nearest, (q @ k.transpose(-1, -2))[0, 0].argmax(-1))
    # and the index uses the same lift: with one projection equal to the query direction, windows centre on it
    sorted_pk, order, qp, scale = m._index(q, k, torch.ones(1, 40, dtype=torch.bool), 40)
    assert sorted_pk.shape == (1, 1, m.opts.n_projections, 1, 40) and qp.shape == (1, 1, m.opts.n_projections, 5)
    assert torch.allclose(scale, kn2.max().sqrt())  # the block's lift radius M


def test_softmax_checkpoint_loads_unchanged_and_nothing_extra_is_saved():
    m = _ice(True)
    assert set(m.state_dict()) == set(softmax_twin_of(m).state_dict())
    twin = _ice(True)
    assert torch.equal(m.projections, twin.projections)  # the seed fixes the index's projections


def test_fast_form_memory_is_bounded_by_the_query_chunk():
    m = make_mixer("iceformer", False, max_len=512, top_k=8, probe=8, n_projections=2, index_block=512,
                   query_chunk=64)
    assert_no_dense_matrix(m, n=512)


@pytest.mark.parametrize("options,field", [
    ({"top_k": 65}, "top_k"),  # k > N (max_len = 64)
    ({"top_k": 0}, "top_k"),
    ({"probe": 0}, "probe"),
    ({"n_projections": 0}, "n_projections"),
    ({"index_block": 0}, "index_block"),
    ({"query_chunk": 0}, "query_chunk"),
    ({"metric": "l1"}, "metric"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=rf"iceformer\.{field}="):
        MIXERS.get("iceformer")(32, 4, options=options, max_len=64)


@pytest.mark.parametrize("n,block", [(67, 4), (40, 8), (9, 9), (1, 4)])
def test_causal_levels_tile_each_prefix_once(n, block):
    """Over the dyadic levels, query i searches blocks that cover [0, B (i // B)) exactly once (then scans
    its own block), so every earlier key is reachable and none is searched twice or from the future."""
    m = make_mixer("iceformer", True, max_len=128, index_block=block)
    bs, levels = m._levels(n)
    i = torch.arange(n)
    cover = torch.zeros(n, n, dtype=torch.long)
    for size in levels:
        ok = m._block_ok(i, -(-n // size), size)  # (n, blocks)
        cover += ok[:, torch.arange(n) // size].long()
    want = (torch.arange(n)[None] < (i // bs * bs)[:, None]).long()
    assert torch.equal(cover, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("metric", ["inner_product", "cosine"])
def test_fast_equals_reference_over_many_levels(causal, metric):
    """67 tokens in blocks of 4: five dyadic levels when causal, 17 searched blocks when bidirectional."""
    m = make_mixer("iceformer", causal, max_len=128, top_k=5, probe=2, n_projections=3, index_block=4,
                   query_chunk=3, metric=metric)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 67, m.d_model, generator=gen)
    keep = torch.rand(2, 67, generator=gen) > 0.2
    keep[:, -1] = True
    for mask in (None, keep):
        assert_forms_agree(m, ("reference", "fast"), x, mask)
