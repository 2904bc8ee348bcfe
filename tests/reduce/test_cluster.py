"""Expediting-ViT's token clustering and reconstruction: as many clusters as tokens with hard assignment is
the identity (operators and whole model), shapes, the error falls as clusters grow, the k-means fixed
point, the local neighbourhood, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efformer.errors import CapabilityError
from efformer.models.factory import create_model
from efformer.reduce import ClusterOptions, ReduceError, cluster_apply, cluster_tokens, reconstruct, relation, remove
from efformer.reduce.cluster import assignment, neighbourhood


def smooth_grid(b: int, h: int, w: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens (b, h*w, d) that vary smoothly over the grid (an upsampled coarse field), like image features."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, d, 3, 3, generator=g)
    fine = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    return fine.flatten(2).transpose(1, 2)


def opts(**kw) -> ClusterOptions:
    return ClusterOptions(**({"clusters": (4, 4), "at": 1} | kw))


@pytest.mark.parametrize("window", [None, 1, 3])
def test_as_many_clusters_as_tokens_with_hard_assignment_is_the_identity(window):
    x = torch.randn(2, 35, 8)
    o = opts(clusters=(5, 7), hard=True, k=1, window=window)
    centers = cluster_tokens(x, (5, 7), o)
    assert torch.equal(centers, x)  # the pool is the grid itself and every token stays its own center
    assert torch.equal(reconstruct(relation(x, centers, o), centers), x)
    refined = torch.randn(2, 35, 8)  # what later blocks make of the cluster tokens comes back in place
    assert torch.equal(reconstruct(relation(x, centers, o), refined), refined)


def test_reconstruction_gives_the_full_grid_and_rows_are_convex_weights_over_k_clusters():
    x = smooth_grid(3, 12, 10, 6)
    o = opts(clusters=(3, 4), k=3)
    centers = cluster_tokens(x, (12, 10), o)
    wts = relation(x, centers, o)
    assert centers.shape == (3, 12, 6) and wts.shape == (3, 120, 12)
    torch.testing.assert_close(wts.sum(-1), torch.ones(3, 120))
    assert bool(((wts > 0).sum(-1) <= 3).all()) and bool((wts >= 0).all())
    assert reconstruct(wts, torch.randn(3, 12, 5)).shape == (3, 120, 5)


@pytest.mark.parametrize("hard", [False, True])
def test_reconstruction_error_falls_as_the_number_of_clusters_grows(hard):
    x = smooth_grid(2, 16, 16, 8, seed=3) + 0.05 * torch.randn(2, 256, 8, generator=torch.Generator().manual_seed(4))
    errors = []
    for side in (1, 2, 4, 8, 16):
        o = opts(clusters=(side, side), hard=hard, k=1 if hard else 3, window=3)
        centers = cluster_tokens(x, (16, 16), o)
        errors.append(float((reconstruct(relation(x, centers, o), centers) - x).pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    # hard: one cluster per token is exact; soft: each token still blends its 3 nearest clusters
    assert errors[-1] == 0.0 if hard else errors[-1] < 0.05 * errors[0]


def test_hard_clustering_is_a_k_means_fixed_point_and_soft_assignment_respects_the_neighbourhood():
    x = smooth_grid(1, 8, 8, 4, seed=5)
    o = opts(clusters=(2, 2), hard=True, iters=30, window=None)
    c = cluster_tokens(x, (8, 8), o)
    allowed = neighbourhood(8, 8, 2, 2, None)
    a = assignment(x, c, allowed, o)  # one more step changes nothing: every center is its tokens' mean
    torch.testing.assert_close((a.transpose(1, 2) @ x) / a.sum(1)[..., None], c)
    local = neighbourhood(8, 8, 4, 4, 1)  # window 1: each token may join only its own cell's center
    assert torch.equal(local.sum(1), torch.ones(64, dtype=torch.long))
    soft = assignment(x, torch.randn(1, 16, 4), local, opts(window=1))
    assert torch.equal(soft > 0, local[None])


def test_the_hook_runs_blocks_on_cluster_tokens_and_restores_the_grid():
    torch.manual_seed(0)
    m = create_model("vit-tiny").eval()
    img = torch.rand(2, 3, 32, 32)
    y0 = m(img)
    hook = cluster_apply(m, (8, 8), at=1, hard=True, k=1)  # 8x8 clusters of the 8x8 grid: exact
    torch.testing.assert_close(m(img), y0, rtol=0, atol=1e-6)
    seen = []
    for blk in m.stages[0]:
        blk.mixer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    hook = cluster_apply(m, (4, 4), at=1, until=3)
    y = m(img)
    assert seen == [65, 17, 17, 65] and hook.last.counts == [65, 17, 17, 65] and y.shape == y0.shape
    seen.clear()
    cluster_apply(m, (2, 4), at=2)  # reconstructed after the last block, before the class token is pooled
    m(img)
    assert seen == [65, 65, 9, 9]
    remove(m)
    assert torch.equal(m(img), y0)


def test_cluster_refusals_name_the_field():
    m = create_model("vit-tiny")
    with pytest.raises(ReduceError) as e:
        cluster_apply(m, (4, 4), at=4)
    assert e.value.field == "at"
    with pytest.raises(ReduceError) as e:
        cluster_apply(m, (4, 4), at=2, until=2)
    assert e.value.field == "until"
    with pytest.raises(ReduceError) as e:
        cluster_apply(m, (0, 4), at=1)
    assert e.value.field == "clusters"
    cluster_apply(m, (9, 4), at=1)
    with pytest.raises(ReduceError, match="at most"):
        m(torch.rand(1, 3, 32, 32))
    with pytest.raises(CapabilityError, match="one-stage"):
        cluster_apply(create_model("swin-tiny"), (2, 2), at=1)
    with pytest.raises(CapabilityError, match="rope2d"):
        cluster_apply(create_model("vit-tiny", positional="rope2d"), (2, 2), at=1)
