"""Token clustering and token reconstruction for dense prediction, training-free.

Paper: "Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning" (Liang et
al., NeurIPS 2022). After block alpha the (h, w) grid of patch tokens is clustered into an (hc, wc)
grid of cluster tokens: centers start as the average pool of the grid, then a few iterations of local
soft k-means (each token is softly assigned, by softmax of -distance / temperature, to the centers of
the ``window`` x ``window`` cells around its own cell; each center becomes the weighted mean of its
tokens). The blocks up to beta run on the cluster tokens only; then token reconstruction gives back
the full grid: every high-resolution token takes the weighted mean of the refined cluster tokens,
with weights exp(-distance / temperature) to its ``k`` nearest clusters, the relation measured between
the tokens and the cluster tokens at alpha. Leading class tokens pass through unchanged.

Choices the paper leaves open (or made from memory of it): distances are mean squared differences per
channel (so the temperatures do not depend on the width); ``hard`` uses the nearest center (k-means),
which with as many clusters as tokens keeps every token as it is. Both forms are dense, with the local
window as a mask (what the paper's local form computes, at O(n m d) instead of O(n window^2 d)).
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.errors import CapabilityError, ShapeError
from efformer.nn.positional import PositionalContext
from efformer.reduce.hook import ReduceError, Trace

NEG = float("-inf")


class ClusterOptions(pydantic.BaseModel):
    """Options of token clustering (after block ``at``) and reconstruction (after block ``until``)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    clusters: tuple[int, int] = pydantic.Field(..., description="(rows, cols) of the cluster-token grid")
    at: int = pydantic.Field(..., ge=1, description="blocks that run on the full grid before clustering (alpha)")
    until: int | None = pydantic.Field(None, ge=1, description="blocks before reconstruction (beta); None: "
                                       "reconstruct after the last block")
    iters: int = pydantic.Field(5, ge=0, le=100, description="soft k-means iterations")
    temperature: float = pydantic.Field(0.05, gt=0, description="softness of the clustering assignment")
    window: int | None = pydantic.Field(5, ge=1, description="side of the neighbourhood of center cells each "
                                        "token may join (odd); None: every center")
    hard: bool = pydantic.Field(False, description="nearest-center assignment (k-means) instead of soft")
    k: int = pydantic.Field(3, ge=1, description="reconstruction: the nearest clusters each token draws from")
    recon_temperature: float = pydantic.Field(0.05, gt=0, description="softness of the reconstruction weights")

    @pydantic.field_validator("clusters")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"clusters must be two positive sides, got {v}")
        return v


def sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Mean squared difference per channel (b, n, m) between rows of x (b, n, d) and c (b, m, d), >= 0."""
    d = (x * x).sum(-1)[..., None] + (c * c).sum(-1)[:, None, :] - 2 * x @ c.transpose(1, 2)
    return d.clamp(min=0) / x.shape[-1]


def neighbourhood(h: int, w: int, hc: int, wc: int, window: int | None, device=None) -> Tensor:
    """Bool (h*w, hc*wc): the centers token i may join, those within window // 2 cells of its own cell."""
    if window is None:
        return torch.ones(h * w, hc * wc, dtype=torch.bool, device=device)
    r, c = torch.arange(h * w, device=device) // w, torch.arange(h * w, device=device) % w
    cell_r, cell_c = r * hc // h, c * wc // w
    jr, jc = torch.arange(hc * wc, device=device) // wc, torch.arange(hc * wc, device=device) % wc
    half = window // 2
    return ((cell_r[:, None] - jr).abs() <= half) & ((cell_c[:, None] - jc).abs() <= half)


def cluster_tokens(x: Tensor, grid: tuple[int, int], opts: ClusterOptions) -> Tensor:
    """Token clustering: patch tokens x (b, h*w, d) on ``grid`` -> cluster tokens (b, hc*wc, d), row-major."""
    b, n, d = x.shape
    h, w = grid
    hc, wc = opts.clusters
    if h * w != n:
        raise ShapeError(f"cluster_tokens: grid {h}x{w} holds {h * w} tokens, got {n}")
    if hc > h or wc > w:
        raise ReduceError("clusters", opts.clusters, f"more cluster rows/cols than the {h}x{w} grid has; give at "
                          f"most ({h}, {w})")
    centers = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, d, h, w), (hc, wc)).flatten(2).transpose(1, 2)
    allowed = neighbourhood(h, w, hc, wc, opts.window, x.device)
    for _ in range(opts.iters):
        a = assignment(x, centers, allowed, opts)
        mass = a.sum(1)  # (b, m): an empty cluster keeps its center
        new = (a.transpose(1, 2) @ x) / mass.clamp(min=1e-12)[..., None]
        centers = torch.where((mass > 0)[..., None], new, centers)
    return centers


def assignment(x: Tensor, centers: Tensor, allowed: Tensor, opts: ClusterOptions) -> Tensor:
    """(b, n, m) weights of every token over the centers of its neighbourhood (rows sum to 1)."""
    dist = sq_dist(x, centers).masked_fill(~allowed, float("inf"))
    if opts.hard:
        return F.one_hot(dist.argmin(-1), centers.shape[1]).to(x.dtype)
    return (-dist / opts.temperature).softmax(-1)


def relation(x: Tensor, centers: Tensor, opts: ClusterOptions) -> Tensor:
    """Reconstruction weights (b, n, m): exp(-distance / T) over each token's k nearest clusters, rows sum to 1."""
    dist = sq_dist(x, centers)
    k = min(opts.k, centers.shape[1])
    near = dist.topk(k, dim=-1, largest=False)
    if k == 1:  # the nearest cluster alone: exact one-hot weights
        return torch.zeros_like(dist).scatter(-1, near.indices, 1.0)
    logits = -(near.values - near.values[..., :1]) / opts.recon_temperature  # stable: nearest at 0
    return torch.zeros_like(dist).scatter(-1, near.indices, logits.softmax(-1))


def reconstruct(weights: Tensor, refined: Tensor) -> Tensor:
    """Token reconstruction: weights (b, n, m) from :func:`relation`, refined cluster tokens (b, m, d) -> (b, n, d)."""
    return weights.to(refined.dtype) @ refined


class ClusterHook:
    """The model's reduction hook for Expediting-ViT: cluster after block ``at``, reconstruct after ``until``
    (or after the last block) of a one-stage image model; built by :func:`efformer.reduce.cluster_apply`."""

    def __init__(self, opts: ClusterOptions, protected: int, depth: int):
        self.opts, self.protected, self.depth = opts, protected, depth
        self.until = depth if opts.until is None else opts.until
        self.last = Trace([])
        self._weights = None

    def begin(self, h: Tensor, mask: Tensor | None, ctx: PositionalContext, *, first: bool = True):
        """Before the blocks: nothing changes yet."""
        if mask is not None or ctx.grid is None:
            raise CapabilityError("token clustering needs an image model's grid of patch tokens (and no padding)")
        self.last, self._weights, self._full_ctx = Trace([h.shape[1]]), None, ctx
        return h, mask, ctx

    def between(self, blocks, j: int, h: Tensor, mask: Tensor | None, ctx: PositionalContext):
        """After block j: cluster (j + 1 == at) or reconstruct (j + 1 == until); returns (h, mask, context)."""
        if j + 1 == self.opts.at:
            p = self.protected
            patches = h[:, p:]
            centers = cluster_tokens(patches, ctx.grid, self.opts)
            self._weights = relation(patches, centers, self.opts)
            h = torch.cat([h[:, :p], centers], 1)
            m = h.shape[1]
            ctx = PositionalContext(torch.arange(m, device=h.device).expand(h.shape[0], m), bias=ctx.bias,
                                    grid=self.opts.clusters)
        elif j + 1 == self.until and self._weights is not None:
            h, ctx = self._restore(h), self._full_ctx
        self.last.counts.append(h.shape[1])
        return h, mask, ctx

    def _restore(self, h: Tensor) -> Tensor:
        p = self.protected
        full = torch.cat([h[:, :p], reconstruct(self._weights, h[:, p:])], 1)
        self._weights = None
        return full

    def end(self, h: Tensor) -> Tensor:
        """After the last block: the full grid (b, p + h*w, d), reconstructed if still clustered."""
        return self._restore(h) if self._weights is not None else h
