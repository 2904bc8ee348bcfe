"""Sparse Sinkhorn attention: balancing converges to a doubly-stochastic matrix, a hard permutation
gives local + partner-block attention, bad options and lengths fail clearly, no N x N in the fast form."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.mixers.sinkhorn import SinkhornAttention, sinkhorn
from tests.helpers import LargestTensor, rel_err, with_form

D, H = 32, 4


def _mixer(max_len: int = 256, **opts) -> SinkhornAttention:
    torch.manual_seed(0)
    return SinkhornAttention(D, H, options={"block_size": 4, "sinkhorn_iters": 4, **opts}, max_len=max_len).eval()


@pytest.mark.parametrize("temperature", [0.75, 0.1])
def test_balancing_converges_to_doubly_stochastic(temperature):
    x = torch.randn(2, 97, D)  # 25 blocks, the last one partial
    col_errs = []
    for iters in (0, 1, 2, 8, 300):
        s = _mixer(sinkhorn_iters=iters, temperature=temperature).sort_matrix(x)
        assert s.shape == (2, H, 25, 25) and (s >= 0).all()
        assert torch.allclose(s.sum(-1), torch.ones(()), atol=1e-5)  # rows: exact after every round
        col_errs.append((s.sum(-2) - 1).abs().max().item())
    assert all(b < a or b < 1e-6 for a, b in zip(col_errs[:-1], col_errs[1:], strict=False)), col_errs  # to float eps
    assert col_errs[0] > 0.5 and col_errs[-1] < 1e-4, col_errs


def test_low_temperature_approaches_a_permutation():
    log_r = torch.randn(3, 6, 6)
    peaks = [sinkhorn(log_r / t, 200).max(-1).values.mean().item() for t in (1.0, 0.3, 0.1, 0.03, 0.01)]
    assert all(a < b for a, b in zip(peaks[:-1], peaks[1:], strict=False)) and peaks[-1] > 0.95, peaks
    hard = sinkhorn(log_r / 0.01, 200)
    assert torch.equal(hard.argmax(-1).sort(-1).values, torch.arange(6).expand(3, 6))  # a bijection


def _partner_block_attention(m: SinkhornAttention, x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """Block i's queries attend, in one softmax, to block i's and block perm[i]'s keys (no padding)."""
    q, k, v = m.split_heads(m.qkv_proj(x), 3 * H).chunk(3, dim=1)
    bs = m.opts.block_size
    out = torch.empty_like(q)
    for i, j in enumerate(perm):
        mine, partner = slice(i * bs, (i + 1) * bs), slice(j * bs, (j + 1) * bs)
        keys = torch.cat([k[:, :, mine], k[:, :, partner]], dim=2)
        vals = torch.cat([v[:, :, mine], v[:, :, partner]], dim=2)
        p = (q[:, :, mine] @ keys.transpose(-1, -2) / (D // H) ** 0.5).softmax(-1)
        out[:, :, mine] = p @ vals
    return m.out_proj(m.merge_heads(out))


def test_a_hard_permutation_means_attending_to_the_partner_block():
    m = _mixer()
    perm = [2, 0, 3, 1, 4]
    hard = torch.eye(5)[perm].expand(1, H, 5, 5)
    m.sort_matrix = lambda x, mask=None: hard  # as if the sorting network had converged on ``perm``
    x = torch.randn(1, 20, D)
    want = _partner_block_attention(m, x, perm)
    for form in ("reference", "fast"):
        assert rel_err(want, with_form(m, form)(x)[0]) < 1e-5, form


def test_sorting_depends_on_content_and_padding_content_is_ignored():
    m = _mixer()
    x = torch.randn(2, 13, D)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[:, 10:] = False
    s = m.sort_matrix(x, keep)
    x2 = x.clone()
    x2[:, 10:] = 100.0
    assert torch.equal(s, m.sort_matrix(x2, keep))
    x2[:, :4] = torch.randn(2, 4, D)
    assert not torch.allclose(s, m.sort_matrix(x2, keep))


def test_fast_form_never_materialises_n_by_n():
    n = 512
    m = with_form(_mixer(block_size=16, max_len=n), "fast")
    x = torch.randn(1, n, D)
    with torch.no_grad(), LargestTensor() as probe:
        m(x)
    assert probe.largest < H * n * n / 4


def test_sequences_longer_than_max_len_are_refused():
    m = _mixer(max_len=16)
    m(torch.randn(1, 16, D))
    with pytest.raises(ShapeError, match="max_len=16"):
        m(torch.randn(1, 17, D))


@pytest.mark.parametrize(
    "opts",
    [{"block_size": 0}, {"temperature": 0.0}, {"sinkhorn_iters": -1}, {"max_len": 2, "block_size": 4}, {"max_len": 0}],
)
def test_bad_options_raise_config_error(opts):
    opts = dict(opts)
    max_len = opts.pop("max_len", 64)
    with pytest.raises(ConfigError, match="sinkhorn|max_len"):
        SinkhornAttention(D, H, options=opts, max_len=max_len)


def test_causal_is_refused_with_a_reason():
    with pytest.raises(CapabilityError, match="bidirectional only"):
        SinkhornAttention(D, H, causal=True)
