"""Combiner (axial, log-sparse): the partitions as documented, full coverage == softmax, regions of
equal keys are exact (the log-count mass), error shrinking with the direct span, no N x N matrix."""

from __future__ import annotations

import math

import pytest
import torch

from efformer.errors import ConfigError
from efformer.registry import MIXERS
from tests.helpers import assert_equals_softmax_under_rope, make_mixer, rel_err, softmax_twin_of, with_form
from tests.mixers.test_local import assert_no_dense_matrix

DIRECTIONS = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


# ---- the partitions, written out independently ------------------------------------------
def _axial(bs, causal):
    def rule(i, j):
        if causal and j > i:
            return "none"
        if i // bs == j // bs or i % bs == j % bs:
            return "direct"
        return ("col", j % bs)
    return rule


def _logsparse(w, causal):
    def rule(i, j):
        d = i - j
        if causal and d < 0:
            return "none"
        a = abs(d)
        if a < w or (a % w == 0 and math.log2(a // w).is_integer()):
            return "direct"
        k = next(k for k in range(64) if w * 2**k < a < w * 2 ** (k + 1))
        return ("gap", k, d < 0)
    return rule


@DIRECTIONS
@pytest.mark.parametrize("name,size,rule", [
    ("combiner_axial", 4, _axial),
    ("combiner_axial", 3, _axial),
    ("combiner_logsparse", 1, _logsparse),
    ("combiner_logsparse", 3, _logsparse),
])
def test_layout_is_the_documented_partition(name, size, rule, causal):
    m = make_mixer(name, causal, **{"block_size" if name == "combiner_axial" else "window": size})
    rule = rule(size, causal)
    for n in (1, 7, 13, 30):
        code = m.layout(torch.arange(n)[:, None], torch.arange(n)[None], n)
        assert int(code.max()) < m.n_regions(n)
        for i in range(n):
            groups: dict = {}
            for j in range(n):
                want = rule(i, j)
                got = int(code[i, j])
                assert (got == -2) == (want == "none") and (got == -1) == (want == "direct"), (n, i, j)
                if got >= 0:
                    groups.setdefault(want, set()).add(got)
            # one id per documented region, distinct regions distinct ids
            assert all(len(ids) == 1 for ids in groups.values())
            assert len({next(iter(ids)) for ids in groups.values()}) == len(groups)


# ---- exact limits ------------------------------------------------------------------------
@DIRECTIONS
@pytest.mark.parametrize("name,options", [
    ("combiner_axial", {"block_size": 11}),  # one row: everything direct
    ("combiner_axial", {"block_size": 32}),
    ("combiner_axial", {"block_size": 1}),  # one column: everything direct
    ("combiner_logsparse", {"window": 11}),
])
def test_full_covering_partition_is_softmax(name, options, causal):
    n = 11
    m = make_mixer(name, causal, **options)
    with torch.no_grad():
        m.region_query.normal_()  # no region exists, so it must not matter
    assert_equals_softmax_under_rope(m, n, {"region_query"}, seed=3)


@DIRECTIONS
@pytest.mark.parametrize("name,options", [("combiner_axial", {"block_size": 3}),
                                          ("combiner_logsparse", {"window": 1})])
def test_regions_of_equal_keys_are_exact(name, options, causal):
    """All keys equal: each region must carry exactly the mass of its keys (the log |region| term), so
    Combiner with any partition equals softmax attention (the mean of the visible values)."""
    m = make_mixer(name, causal, **options)
    with torch.no_grad():
        m.kv_proj.weight[: m.n_kv_heads * m.head_dim] = 0  # every key is 0
        m.region_query.normal_()
    x = torch.randn(2, 23, m.d_model)
    want, _ = softmax_twin_of(m, {"region_query"})(x)
    for form in ("reference", "fast"):
        got, _ = with_form(m, form)(x)
        assert rel_err(want, got) < 1e-5, form


def test_wider_direct_span_is_closer_to_softmax():
    """w = 1, 2 and 4 give the same partition up to singleton regions (which are exact), so 1, 8, 16, 32."""
    n, errs = 32, []
    for w in (1, 8, 16, 32):
        total = 0.0
        for seed in range(3):
            m = make_mixer("combiner_logsparse", True, window=w)
            x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(seed))
            total += rel_err(softmax_twin_of(m, {"region_query"})(x)[0], m(x)[0])
        errs.append(total / 3)
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-5


def test_region_query_weights_the_region_values():
    """w_h only reweights inside regions: it changes outputs when regions exist and keys differ."""
    m = make_mixer("combiner_axial", False, block_size=4)
    x = torch.randn(1, 16, m.d_model)
    before, _ = m(x)
    with torch.no_grad():
        m.region_query.normal_(std=3.0)
    assert rel_err(before, m(x)[0]) > 1e-3


@pytest.mark.parametrize("name,causal,options,n", [
    ("combiner_axial", False, {"block_size": 16}, 256),
    ("combiner_axial", True, {"block_size": 16}, 256),
    ("combiner_logsparse", True, {"window": 1}, 512),
])
def test_fast_form_has_no_dense_matrix(name, causal, options, n):
    assert_no_dense_matrix(make_mixer(name, causal, **options), n=n)


@pytest.mark.parametrize("name,field", [("combiner_axial", "block_size"), ("combiner_logsparse", "window")])
def test_bad_option_names_the_field(name, field):
    with pytest.raises(ConfigError, match=rf"{name}\.{field}=0"):
        MIXERS.get(name)(32, 4, options={field: 0})
