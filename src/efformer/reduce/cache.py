"""Cross-Layer Cache Aggregation (CLCA): a plug-in head that gives back what token reduction removed.

Paper: "Cross-Layer Cache Aggregation for Token Reduction in Ultra-Fine-Grained Image Recognition"
(Rios et al., ICASSP 2025). Two parts: a Cross-Layer Cache that keeps information from earlier layers
for later use, and a Cross-Layer Aggregation classification head that aggregates intermediate
features, so that a model can keep very few tokens and still see what earlier layers knew.

Here ``apply(model, "clca", schedule, base="tome", base_options={...})`` wraps any other method. The
cache holds, per forward, (1) the class token after every block that has a reduction point after it
and (2) at every point that removes tokens, the size-weighted mean of the tokens it merges away or
prunes (what the rest of the network no longer sees on its own). The aggregation feeds the model's
head with ``f + gate * out(attention pool of the cache entries, queried by f)``, f being the features
the head got before; each entry is normalised and tagged with a learned embedding of where it came
from. ``gate`` starts at zero, so attaching CLCA changes no output until it is trained (through the
trainer, with the base method's loss if it has one). Which entries to cache and this form of the head
are our reading of the paper's abstract; its code was not read.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, UnknownNameError
from efformer.reduce.hook import Assignment, ReduceError, TokenView
from efformer.reduce.learned import mark_for_save, unmark
from efformer.reduce.methods import METHODS, Method, get_method


class CrossLayerAggregation(nn.Module):
    """The cache (entries of width d, from 2 x ``points`` places) and the gated aggregation of it: (b, d) -> (b, d)."""

    def __init__(self, d: int, points: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.where = nn.Parameter(torch.randn(2 * points, d) * 0.02)  # class token of point i: i; removed: P + i
        self.query = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.zeros(d))
        self.entries: list[tuple[int, Tensor]] = []

    def forward(self, f: Tensor) -> Tensor:
        """f (b, d) plus the gated attention pool over this forward's cache entries (f itself if none)."""
        if not self.entries:
            return f
        idx = torch.tensor([i for i, _ in self.entries], device=f.device)
        e = self.norm(torch.stack([v for _, v in self.entries], 1).to(f.dtype)) + self.where[idx].to(f.dtype)
        a = (e @ self.query(f)[..., None])[..., 0] * e.shape[-1] ** -0.5  # (b, K)
        pooled = (a.softmax(-1)[..., None] * e).sum(1)
        return f + self.gate * self.out(pooled)


class CLCA(Method):
    """Cross-Layer Cache Aggregation around a base method (any name in METHODS, with its options)."""

    name = "clca"

    class Options(Method.Options):
        base: str = pydantic.Field("tome", description="the token-reduction method CLCA wraps")
        base_options: dict[str, Any] = pydantic.Field(default_factory=dict, description="options of the base method")

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts.base == self.name:
            raise ReduceError("clca.base", self.opts.base, "CLCA wraps another method (tome, pitome, ltm, ...)")
        try:
            self.base = get_method(self.opts.base, **self.opts.base_options)
        except UnknownNameError:
            raise ReduceError("clca.base", self.opts.base, f"one of {', '.join(sorted(METHODS))}") from None
        self.needs_attention = self.base.needs_attention
        self.default_where = self.base.default_where  # the base method's placement
        self.agg: CrossLayerAggregation | None = None

    def attach(self, model: nn.Module, stacks: list, reducer: Any) -> None:
        """Register the aggregation as ``model.reduce_cache``, the cache hooks on the blocks and the heads."""
        if reducer.protected < 1:
            raise CapabilityError("CLCA caches the class token of every reduction point; build the model with "
                                  "pooling='cls'")
        heads = [getattr(model, n) for n in ("head", "head_dist") if isinstance(getattr(model, n, None), nn.Module)]
        if not heads or type(model).__name__ == "DualEncoderClassifier":
            raise CapabilityError(f"CLCA feeds a classification head on one encoder's class token; "
                                  f"{type(model).__name__} has none it can feed")
        points = [blk for blocks in stacks for blk in blocks[:reducer.points_in(len(blocks))]]  # mid: every block
        widths = {int(blk.mixer.d_model) for blocks in stacks for blk in blocks}
        if len(widths) != 1:
            raise CapabilityError(f"CLCA aggregates class tokens of one width, but the stages have widths "
                                  f"{sorted(widths)}; use it on single-width encoders (vit, deit, text)")
        if hasattr(self.base, "attach"):
            self.base.attach(model, stacks, reducer)
        if self.agg is None or list(self._point) != [id(blk) for blk in points]:  # (kept on re-applying)
            self._point = {id(blk): i for i, blk in enumerate(points)}
            self.agg = CrossLayerAggregation(widths.pop(), max(len(points), 1)).to(next(model.parameters()).device)
        self.agg.train(model.training)
        model.reduce_cache = self.agg
        mark_for_save(model, self, reducer)
        agg = self.agg

        def record(i: int):
            return lambda _m, _args, out: agg.entries.append((i, out[0][:, 0]))

        def feed(_m, args):
            return (agg(args[0]), *args[1:])

        def clear(_m, _args):
            agg.entries.clear()
        self._hooks = [blk.register_forward_hook(record(i)) for i, blk in enumerate(points)]
        self._hooks += [h.register_forward_pre_hook(feed) for h in heads]
        self._hooks.append(model.register_forward_pre_hook(clear))

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach` (and the base method's)."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        if "reduce_cache" in model._modules:
            del model._modules["reduce_cache"]
        unmark(model)
        if hasattr(self.base, "detach"):
            self.base.detach(model)

    def assign(self, view: TokenView, r: int) -> Assignment:
        """The base method's assignment; the size-weighted mean of the tokens it removes goes into the cache."""
        a = self.base.assign(view, r)
        tok = view.tok
        removed = a.dst != torch.arange(tok.x.shape[1], device=tok.x.device)
        w = tok.size * removed
        mean = (w[..., None].to(tok.x.dtype) * tok.x).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-30).to(tok.x.dtype)
        if self.agg is not None:
            self.agg.entries.append((len(self._point) + self._point[id(view.blocks[view.j])], mean))
        return a

    def clear(self) -> None:
        """Forget the base method's records (see :func:`efformer.reduce.learned.train_loss`)."""
        if hasattr(self.base, "clear"):
            self.base.clear()

    def extra_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        """The base method's per-example loss terms, if it has any (b,)."""
        if hasattr(self.base, "extra_loss"):
            return self.base.extra_loss(logits, label)
        return torch.zeros_like(label, dtype=logits.dtype)


METHODS[CLCA.name] = CLCA
