"""Sparse attention (Longformer, Sparse Transformer, BigBird): patterns, exact limits, random blocks, decode."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError
from efformer.registry import MIXERS
from tests.helpers import make_mixer, rel_err, with_form
from tests.mixers.test_local import (
    assert_equals_softmax,
    assert_forms_agree_with_positional,
    assert_no_dense_matrix,
    check_pattern,
    decode,
    seen_keys,
    softmax_twin,
)

DIRECTIONS = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


# ---- patterns written out independently --------------------------------------------------
def _longformer(w, g, c):
    return lambda i, j: (abs(i - j) < w or i < g or j < g) and (not c or j <= i)


def _strided(ell, c):
    return lambda i, j: (abs(i - j) < ell or (i - j) % ell == 0) and (not c or j <= i)


def _fixed(ell, s, c):
    return lambda i, j: (i // ell == j // ell or j % ell >= ell - s) and (not c or j <= i)


PATTERNS = [
    ("longformer", {"window": 2, "global_tokens": 2}, _longformer(2, 2, False), _longformer(2, 2, True)),
    ("longformer", {"window": 4, "global_tokens": 0}, _longformer(4, 0, False), _longformer(4, 0, True)),
    ("sparse_transformer", {"stride": 3}, _strided(3, False), _strided(3, True)),
    ("sparse_transformer", {"stride": 5}, _strided(5, False), _strided(5, True)),
    ("sparse_transformer", {"pattern": "fixed", "stride": 4}, _fixed(4, 1, False), _fixed(4, 1, True)),
    ("sparse_transformer", {"pattern": "fixed", "stride": 5, "summary": 2}, _fixed(5, 2, False), _fixed(5, 2, True)),
]


@DIRECTIONS
@pytest.mark.parametrize("name,options,bidir,causal_rule", PATTERNS, ids=[f"{p[0]}-{p[1]}" for p in PATTERNS])
def test_pattern_is_the_documented_one(name, options, bidir, causal_rule, causal):
    m = make_mixer(name, causal, **options)
    for n in (1, 7, 13, 26):
        check_pattern(m, n, causal_rule if causal else bidir)


def _block_sets(m, n: int, bs: int) -> list[set[int]]:
    """For each query block, the key blocks its first query sees (from the reference form's weights)."""
    rows = seen_keys(m, n, "reference") > 0
    return [set((rows[qb * bs].nonzero().flatten() // bs).tolist()) for qb in range(-(-n // bs))]


@DIRECTIONS
def test_bigbird_pattern_is_window_global_and_random(causal):
    bs, g, r, n = 2, 1, 2, 41
    m = make_mixer("bigbird", causal, block_size=bs, num_global_blocks=g, num_random_blocks=r)
    nb = -(-n // bs)
    for qb, seen in enumerate(_block_sets(m, n, bs)):
        if qb < g:  # global rows see everything (before them, when causal)
            assert seen == set(range(qb + 1 if causal else nb))
            continue
        window = {b for b in (qb - 1, qb, qb + 1) if 0 <= b < nb and (not causal or b <= qb)}
        assert window | set(range(g)) <= seen
        extra = seen - window - set(range(g))
        pool = set(range(g, qb - 1)) if causal else set(range(g, nb)) - window
        assert extra <= pool and len(extra) <= r
        assert len(extra) >= min(1, len(pool)), f"block {qb} got no random block"
    # Both forms see exactly the same keys, each once (uniform weights over the same set).
    for length in (1, 7, 13, n):
        assert torch.allclose(seen_keys(m, length, "reference"), seen_keys(m, length, "fast"), atol=1e-6)


def test_bigbird_random_blocks_are_a_seeded_buffer():
    m = make_mixer("bigbird", False, block_size=2, num_random_blocks=2, num_global_blocks=1)
    first = seen_keys(m, 40, "reference")
    assert torch.equal(first, seen_keys(m, 40, "reference"))  # fixed between calls
    twin = make_mixer("bigbird", False, block_size=2, num_random_blocks=2, num_global_blocks=1)
    assert torch.equal(first, seen_keys(twin, 40, "reference"))  # same global seed, same draw
    assert "seed" in m.state_dict()  # saved with the weights, so a reloaded model keeps its pattern
    torch.manual_seed(123)
    m.redraw_random_blocks()
    assert not torch.equal(first, seen_keys(m, 40, "reference"))


def test_bigbird_causal_pattern_never_depends_on_later_tokens():
    m = make_mixer("bigbird", True, block_size=2, num_random_blocks=2, num_global_blocks=1)
    short, long = seen_keys(m, 16, "reference"), seen_keys(m, 40, "reference")
    assert torch.equal(short > 0, long[:16, :16] > 0)


# ---- exact limits ------------------------------------------------------------------------
@DIRECTIONS
@pytest.mark.parametrize(
    "name,options",
    [
        ("longformer", {"window": 1, "global_tokens": 11}),  # every token global
        ("longformer", {"window": 11, "global_tokens": 0}),  # window covers the sequence
        ("bigbird", {"block_size": 3, "num_global_blocks": 4, "num_random_blocks": 1}),  # every block global
        ("bigbird", {"block_size": 11, "num_global_blocks": 0, "num_random_blocks": 0}),  # one block
        ("sparse_transformer", {"stride": 11}),
        ("sparse_transformer", {"pattern": "fixed", "stride": 11}),
    ],
)
def test_full_coverage_equals_softmax(name, options, causal):
    assert_equals_softmax(make_mixer(name, causal, n_kv_heads=2, **options))


def test_more_random_blocks_get_closer_to_softmax():
    """BigBird's error against full attention falls as random blocks are added (fixed seeds)."""
    x = torch.randn(2, 48, 32, generator=torch.Generator().manual_seed(9))
    errs = []
    for r in (0, 4, 8, 12):
        m = make_mixer("bigbird", False, block_size=3, num_global_blocks=0, num_random_blocks=r)
        errs.append(rel_err(softmax_twin(m)(x)[0], m(x)[0]))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


# ---- forms -------------------------------------------------------------------------------
FAST_CASES = [
    ("longformer", {"window": 3, "global_tokens": 2}),
    ("sparse_transformer", {"stride": 4}),
    ("sparse_transformer", {"pattern": "fixed", "stride": 4, "summary": 2}),
    ("bigbird", {"block_size": 2, "num_random_blocks": 2, "num_global_blocks": 1}),
]


@DIRECTIONS
@pytest.mark.parametrize("name,options", FAST_CASES, ids=[f"{c[0]}-{c[1]}" for c in FAST_CASES])
def test_forms_agree_with_rotary_and_bias(name, options, causal):
    assert_forms_agree_with_positional(make_mixer(name, causal, **options), n=21)


@pytest.mark.parametrize(
    "name,options",
    [
        ("longformer", {"window": 8, "global_tokens": 2}),
        ("sparse_transformer", {"stride": 16}),
        ("sparse_transformer", {"pattern": "fixed", "stride": 16}),
        ("bigbird", {"block_size": 8, "num_random_blocks": 2, "num_global_blocks": 1}),
    ],
)
def test_fast_form_has_no_dense_matrix(name, options):
    assert_no_dense_matrix(make_mixer(name, False, **options))


# ---- decoding ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", FAST_CASES, ids=[f"{c[0]}-{c[1]}" for c in FAST_CASES])
def test_decode_matches_full_forward(name, options):
    m = with_form(make_mixer(name, True, **options), "reference")
    n = 21
    x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(10))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :4] = False
    y_full, _ = m(x, mask=keep)
    for form, chunks in [(f, c) for f in ("reference", "fast") for c in ([1] * n, [6, 1, 7, 7])]:
        y, sizes = decode(with_form(m, form), x, chunks, keep)
        assert rel_err(y_full, y) < 1e-5, f"{form}: decode in chunks {chunks} differs"
        if name == "longformer":  # bounded: the 2 global tokens plus the last window - 1 keys
            assert max(sizes) == 2 + 3 - 1
        else:  # strided, summary and random keys reach arbitrarily far back: a full cache
            assert sizes[-1] == n


# ---- options -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,options,field",
    [
        ("longformer", {"window": 0}, "window"),
        ("longformer", {"global_tokens": -1}, "global_tokens"),
        ("sparse_transformer", {"stride": 0}, "stride"),
        ("sparse_transformer", {"pattern": "diagonal"}, "pattern"),
        ("sparse_transformer", {"stride": 4, "summary": 5}, "summary"),
        ("bigbird", {"block_size": 0}, "block_size"),
        ("bigbird", {"num_random_blocks": -1}, "num_random_blocks"),
    ],
)
def test_bad_option_names_the_field(name, options, field):
    with pytest.raises(ConfigError, match=rf"{name}\.{field}="):
        MIXERS.get(name)(32, 4, causal=False, options=options)
