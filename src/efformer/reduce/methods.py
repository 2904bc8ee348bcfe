"""Which tokens to merge or prune at one reduction point: ToMe and four training-free successors.

Papers: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023: bipartite soft matching);
"Accelerating Transformers with Spectrum-Preserving Token Merging" (Tran et al., NeurIPS 2024:
PiToMe's energy score); "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
Graph in Pre-Trained Transformers" (Wang et al., CVPR 2024); "Multi-criteria Token Fusion with
One-step-ahead Attention for Efficient Vision Transformers" (Lee et al., CVPR 2024: MCTF); "Token
Transforming: A Unified and Training-Free Token Compression Framework for Vision Transformer
Acceleration" (Zeng et al., 2025).

Each method maps a :class:`~efformer.reduce.hook.TokenView` (tokens, sizes, mask, this block's q and
k) and a count r to an :class:`~efformer.reduce.hook.Assignment` that removes exactly r tokens and
never touches the protected prefix (class / distillation tokens). Padding (mask False, size 0) is
removed first where the method allows, and never adds to a real token. Choices the papers leave open
(or that were made from memory of them, with no reference code read) are written next to the code.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pydantic
import torch
from torch import Tensor

from efformer.errors import UnknownNameError
from efformer.reduce.hook import Assignment, ReduceError, TokenView, attention_map

NEG = float("-inf")


def normalized(m: Tensor) -> Tensor:
    """Rows (b, t, c) scaled to unit L2 norm (cosine similarity by dot products)."""
    return m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def identity_dst(b: int, t: int, device) -> Tensor:
    """(b, t) long: every token kept (its own destination)."""
    return torch.arange(t, device=device).expand(b, t).clone()


def halves(m: Tensor, a_idx: Tensor, b_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of m (b, t, c) at A and at B; ToMe's even/odd split is a strided view (no copy)."""
    t = m.shape[1]
    if a_idx.shape[1] == (t + 1) // 2 and b_idx.shape[1] == t // 2 and bool((a_idx[0, 1:2] == 2).all()):
        return m[:, 0::2], m[:, 1::2]
    return (m.gather(1, i[..., None].expand(-1, -1, m.shape[2])) for i in (a_idx, b_idx))


def match(m: Tensor, a_idx: Tensor, b_idx: Tensor, view: TokenView, scores: Tensor | None = None):
    """Best partner in B of every A token: (max score (b, ta), partner index in B (b, ta)); protected
    and padding rules applied. a_idx, b_idx (b, ta) / (b, tb) index the current tokens."""
    if scores is None:
        ma, mb = halves(m, a_idx, b_idx)
        scores = ma @ mb.transpose(1, 2)
    mask = view.tok.mask
    if mask is not None:  # padding merges first (it adds nothing); a real token never picks a padding slot
        pad_a, pad_b = ~mask.gather(1, a_idx), ~mask.gather(1, b_idx)
        scores = scores.masked_fill(~pad_a[..., None] & pad_b[:, None, :], NEG)
        scores = torch.where(pad_a[..., None], torch.full_like(scores, 3.0), scores)
    p = view.protected
    if p:
        scores = scores.masked_fill((a_idx < p)[..., None] | (b_idx < p)[:, None, :], NEG)
    return scores.max(-1)


def merge_top(dst: Tensor, a_idx: Tensor, b_idx: Tensor, best: Tensor, partner: Tensor, r: int) -> Tensor:
    """dst with the r A tokens of highest ``best`` sent to their partners in B."""
    src = best.argsort(-1, descending=True)[:, :r]
    return dst.scatter(1, a_idx.gather(1, src), b_idx.gather(1, partner.gather(1, src)))


def alternate(t: int, b: int, device) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite split: A = even positions, B = odd positions, (b, ta) and (b, tb)."""
    return (torch.arange(0, t, 2, device=device).expand(b, -1), torch.arange(1, t, 2, device=device).expand(b, -1))


class Method:
    """Base of reduction methods: ``assign(view, r)`` -> Assignment; options are a pydantic model."""

    name: ClassVar[str] = "?"
    needs_attention: ClassVar[bool] = False
    # apply's placement when the caller names none: ToMe's (between each block's mixer and FFN)
    default_where: ClassVar[str] = "mid"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **options):
        try:
            self.opts = self.Options(**options)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            field = ".".join(map(str, err["loc"])) or "options"
            raise ReduceError(f"{self.name}.{field}", err.get("input"), err["msg"] + self._fields()) from None

    def _fields(self) -> str:
        fields = self.Options.model_fields
        return f" (options of {self.name!r}: {', '.join(fields) or 'none'})"

    def assign(self, view: TokenView, r: int) -> Assignment:  # pragma: no cover - abstract
        """Which token each token goes into, removing exactly r tokens."""
        raise NotImplementedError


class ToMe(Method):
    """Bipartite soft matching on keys: the r best-matched even tokens merge into their odd partners."""

    name = "tome"

    def assign(self, view: TokenView, r: int) -> Assignment:
        """ToMe's rule: cosine of head-averaged keys, each A keeps its best B, the top r A merge."""
        m = normalized(view.metric())
        b, t, _ = m.shape
        a_idx, b_idx = alternate(t, b, m.device)
        best, partner = match(m, a_idx, b_idx, view)
        return Assignment(merge_top(identity_dst(b, t, m.device), a_idx, b_idx, best, partner, r))


class PiToMe(Method):
    """PiToMe: only the 2r tokens of highest energy (most similar neighbours) are matched; isolated tokens stay."""

    name = "pitome"

    class Options(Method.Options):
        margin: float | None = pydantic.Field(None, ge=-1.0, le=1.0, description="similarity margin m of the "
                                              "energy; None: the paper's layer-dependent 0.9 - 0.9 l / L")
        alpha: float = pydantic.Field(1.0, gt=0, description="slope of the exponential branch below the margin")

    def energy(self, sim: Tensor, view: TokenView) -> Tensor:
        """E_i = mean_j f(cos(x_i, x_j)), f(x) = x above the margin, alpha (e^(x - m) - 1) below (b, t)."""
        m = self.opts.margin
        if m is None:
            m = 0.9 - 0.9 * view.j / max(len(view.blocks) - 1, 1)
        f = torch.where(sim >= m, sim, self.opts.alpha * (torch.exp(sim - m) - 1))
        if view.tok.mask is not None:  # energy over real tokens only
            keep = view.tok.mask[:, None, :].to(f.dtype)
            return (f * keep).sum(-1) / keep.sum(-1).clamp(min=1)
        return f.mean(-1)

    def assign(self, view: TokenView, r: int) -> Assignment:
        """Rank by energy (padding first, protected never), split the top 2r alternately, merge all r A tokens."""
        m = normalized(view.metric())
        b, t, _ = m.shape
        sim = m @ m.transpose(1, 2)
        e = self.energy(sim, view)
        if view.tok.mask is not None:
            e = e.masked_fill(~view.tok.mask, math.inf)
        e[:, : view.protected] = NEG
        cand = e.argsort(-1, descending=True)[:, : 2 * r]
        a_idx, b_idx = cand[:, 0::2], cand[:, 1::2]
        scores = sim.gather(1, a_idx[..., None].expand(-1, -1, t)).gather(2, b_idx[:, None, :].expand(-1, r, -1))
        best, partner = match(m, a_idx, b_idx, view, scores)
        return Assignment(merge_top(identity_dst(b, t, m.device), a_idx, b_idx, best, partner, r))


def nearest_kept(m: Tensor, kept: Tensor, protected: int) -> Tensor:
    """For every token, the most similar kept unprotected token (b, t) (kept tokens: themselves)."""
    b, t, _ = m.shape
    sim = m @ m.transpose(1, 2)
    allowed = kept.clone()
    allowed[:, :protected] = False
    if not bool(allowed.any(1).all()):
        allowed = kept
    nearest = sim.masked_fill(~allowed[:, None, :], NEG).argmax(-1)
    return torch.where(kept, torch.arange(t, device=m.device), nearest)


def prune(m: Tensor, drop: Tensor, protected: int) -> Assignment:
    """Drop the tokens in ``drop`` (b, t) bool: weight 0, unmerge sends them to their most similar kept token."""
    return Assignment(nearest_kept(m, ~drop, protected), weight=(~drop).float())


def weighted_pagerank(attn: Tensor, mask: Tensor | None, iters: int) -> Tensor:
    """Zero-TPrune's importance (b, t): s <- A^T s over the head-averaged attention graph A (b, t, t)."""
    a = attn.mean(1)
    s = torch.ones(a.shape[:2], device=a.device, dtype=a.dtype)
    if mask is not None:
        s = s * mask.to(a.dtype)
    s = s / s.sum(-1, keepdim=True)
    for _ in range(iters):  # a token matters if tokens that matter attend to it
        s = (a.transpose(1, 2) @ s[..., None])[..., 0]
    return s


class ZeroTPrune(Method):
    """Zero-TPrune: prune the least important tokens (weighted PageRank), then the most redundant ones."""

    name = "zero_tprune"
    needs_attention = True

    class Options(Method.Options):
        iters: int = pydantic.Field(20, ge=1, le=200, description="PageRank iterations of the I-stage")
        similarity_share: float = pydantic.Field(0.5, ge=0, le=1, description="fraction of r pruned by "
                                                 "similarity (S-stage); the rest by importance (I-stage)")

    def assign(self, view: TokenView, r: int) -> Assignment:
        """I-stage: drop the r_I lowest PageRank scores; S-stage: alternate the rest by importance, drop the
        r_S less important tokens most similar to a partner in the other half."""
        m = normalized(view.metric())
        b, t, _ = m.shape
        s = weighted_pagerank(view.attention(), view.tok.mask, self.opts.iters)
        if view.tok.mask is not None:
            s = s.masked_fill(~view.tok.mask, NEG)  # padding goes first
        s[:, : view.protected] = math.inf
        r_s = round(r * self.opts.similarity_share)
        order = s.argsort(-1, descending=True)  # most important first
        survivors = order[:, : t - (r - r_s)]
        drop = torch.ones(b, t, dtype=torch.bool, device=m.device).scatter(1, survivors, False)
        if r_s:  # survivors ranked by importance, split alternately: B (more important) and A
            a_idx, b_idx = survivors[:, 1::2], survivors[:, 0::2]
            best, _ = match(m, a_idx, b_idx, view)
            drop = drop.scatter(1, a_idx.gather(1, best.argsort(-1, descending=True)[:, :r_s]), True)
        return prune(m, drop, view.protected)


class MCTF(Method):
    """MCTF: bipartite matching on similarity x (1 / informativeness) x (1 / size), informativeness from
    the next block's attention (one step ahead)."""

    name = "mctf"
    needs_attention = True

    class Options(Method.Options):
        tau_sim: float = pydantic.Field(1.0, ge=0, description="exponent of the similarity criterion")
        tau_info: float = pydantic.Field(1.0, ge=0, description="exponent of the informativeness criterion")
        tau_size: float = pydantic.Field(1.0, ge=0, description="exponent of the size criterion")

    def informativeness(self, view: TokenView) -> Tensor:
        """Attention each token receives (b, t), from the next block's q and k on these tokens when that
        block is a pre-norm softmax block (one step ahead), else from this block's attention."""
        nxt = view.blocks[view.j + 1] if view.j + 1 < len(view.blocks) else None
        if nxt is not None and hasattr(nxt.mixer, "qkv_heads") and getattr(nxt, "placement", "") == "pre":
            q, k, _ = nxt.mixer.qkv_heads(nxt.norm1(view.tok.x), view.ctx)
            size = view.tok.size if view.prop_attn else None
            attn = attention_map(q, k, size, view.tok.mask)
        else:
            attn = view.attention()
        return attn.mean(1).mean(1)

    def assign(self, view: TokenView, r: int) -> Assignment:
        """Attraction W_ij = sim^tau_sim (1 / (a_i + a_j))^tau_info (1 / (s_i + s_j))^tau_size on ToMe's halves."""
        o = self.opts
        m = normalized(view.metric())
        b, t, _ = m.shape
        a_idx, b_idx = alternate(t, b, m.device)
        info = self.informativeness(view) * t  # mean 1, so the exponents weigh comparable numbers
        size = view.tok.size
        ma, mb = halves(m, a_idx, b_idx)
        sim = (ma @ mb.transpose(1, 2)).clamp(min=1e-6)  # negative similarity: never attractive

        def pair(v: Tensor) -> Tensor:
            return v.gather(1, a_idx)[..., None] + v.gather(1, b_idx)[:, None, :]
        w = sim ** o.tau_sim * pair(info).clamp(min=1e-6) ** -o.tau_info * pair(size).clamp(min=1e-6) ** -o.tau_size
        best, partner = match(m, a_idx, b_idx, view, w)
        return Assignment(merge_top(identity_dst(b, t, m.device), a_idx, b_idx, best, partner, r))


class TokenTransforming(Method):
    """Token Transforming: keep the t - r most attended tokens; every other token is spread over them by a
    many-to-many matrix (softmax of similarity); ``hard``: its best one only (merging); ``prune``: none."""

    name = "token_transforming"

    class Options(Method.Options):
        mode: str = pydantic.Field("soft", pattern="^(soft|hard|prune)$", description="soft (many-to-many), "
                                   "hard (one-to-one merging) or prune (a selection matrix)")
        temperature: float = pydantic.Field(0.1, gt=0, description="softmax temperature of the soft weights")
        top_k: int = pydantic.Field(4, ge=1, description="soft mode: each token spreads over its k most similar")

    def assign(self, view: TokenView, r: int) -> Assignment:
        """The transformation matrix (b, t - r, t) over the kept tokens (in order), with dst for unmerge."""
        m = normalized(view.metric())
        b, t, _ = m.shape
        if view.qk is not None:
            score = view.attention().mean(1).mean(1)  # attention received: what the paper keeps
        else:
            score = view.tok.x.norm(dim=-1)  # no attention map recorded: token norm as importance
        if view.tok.mask is not None:
            score = score.masked_fill(~view.tok.mask, NEG)
        score[:, : view.protected] = math.inf
        kept_idx = score.argsort(-1, descending=True)[:, : t - r].sort(-1).values
        kept = torch.zeros(b, t, dtype=torch.bool, device=m.device).scatter(1, kept_idx, True)
        dst = nearest_kept(m, kept, view.protected)
        if self.opts.mode == "prune":
            return Assignment(dst, weight=kept.float())
        mk = m.gather(1, kept_idx[..., None].expand(-1, -1, m.shape[2]))
        sim = mk @ m.transpose(1, 2)  # (b, t - r, t): kept rows, all tokens as columns
        sim = sim.masked_fill((kept_idx < view.protected)[..., None], NEG)  # nothing merges into protected
        if self.opts.mode == "hard":
            weights = torch.zeros_like(sim).scatter(1, sim.argmax(1, keepdim=True), 1.0)
        else:
            k = min(self.opts.top_k, t - r)
            top = sim.topk(k, dim=1)
            weights = torch.zeros_like(sim).scatter(1, top.indices, (top.values / self.opts.temperature).softmax(1))
        eye = torch.zeros_like(sim).scatter(2, kept_idx[..., None], 1.0)
        matrix = torch.where(kept[:, None, :], eye, weights)
        return Assignment(dst, matrix=matrix)


METHODS: dict[str, type[Method]] = {c.name: c for c in (ToMe, PiToMe, ZeroTPrune, MCTF, TokenTransforming)}


def get_method(method: str | Method, **options) -> Method:
    """A method instance from its name (see METHODS) and options, or the instance given."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise UnknownNameError("token-reduction method", method, METHODS)
    return METHODS[method](**options)
