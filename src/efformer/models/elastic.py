"""MatFormer elastic models (see ``efformer.nn.matformer``): choose the active granularity of every
layer, list the granularity settings a training step sums its loss over, and ``extract`` a
standalone smaller model (Mix'n'Match: one width per layer) that computes the chosen submodel."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from efformer.errors import ConfigError
from efformer.models.config import build_config
from efformer.nn.matformer import MatFormerFFN

Widths = list[float]


def matformer_ffns(model: nn.Module) -> list[MatFormerFFN]:
    """The MatFormer FFN of each layer, in order (empty for other models)."""
    blocks = getattr(getattr(model, "backbone", None), "blocks", [])
    return [b.ffn for b in blocks if isinstance(b.ffn, MatFormerFFN)]


def _per_layer(model: nn.Module, widths: float | Sequence[float]) -> Widths:
    ffns = matformer_ffns(model)
    if not ffns:
        raise ConfigError("model.ffn", getattr(model.cfg, "ffn", None), "'matformer' (nested FFN widths) to choose "
                          "widths or extract a submodel")
    per = [float(widths)] * len(ffns) if isinstance(widths, int | float) else [float(w) for w in widths]
    if len(per) != len(ffns):
        raise ConfigError("widths", list(widths), f"one width per layer ({len(ffns)} layers), or one for all")
    grans = ffns[0].opts.granularities
    bad = [w for w in per if w not in grans]
    if bad:
        raise ConfigError("widths", bad[0], f"one of the nested granularities {grans}")
    return per


@contextlib.contextmanager
def use_widths(model: nn.Module, widths: float | Sequence[float] | None) -> Iterator[nn.Module]:
    """Run ``model`` at one granularity per layer (or one for all) inside the block; None: unchanged."""
    if widths is None:
        yield model
        return
    per = _per_layer(model, widths)
    ffns = matformer_ffns(model)
    before = [f.width for f in ffns]
    try:
        for f, w in zip(ffns, per, strict=True):
            f.width = w
        yield model
    finally:
        for f, w in zip(ffns, before, strict=True):
            f.width = w


def step_widths(model: nn.Module, step: int) -> list[Widths | None]:
    """The width settings one training step sums its loss over, the full model first ([None] if not elastic).

    joint: every granularity in all layers at once; random (POA): the full model plus one per-layer mix
    drawn from a generator seeded by the step, so a resumed run draws the same sub-networks."""
    ffns = matformer_ffns(model)
    if not ffns or ffns[0].opts.layer_widths is not None:  # an extracted model trains as it is
        return [None]
    grans, n = ffns[0].opts.granularities, len(ffns)
    if ffns[0].opts.training == "joint":
        return [[g] * n for g in reversed(grans)]
    rng = random.Random(step)
    return [[grans[-1]] * n, [rng.choice(grans) for _ in range(n)]]


@torch.no_grad()
def extract(model: nn.Module, widths: float | Sequence[float]) -> nn.Module:
    """A standalone model holding only the first neurons of each layer's granularity; it equals
    ``model`` run under ``use_widths(model, widths)`` and saves and loads like any efformer model."""
    per = _per_layer(model, widths)
    opts = matformer_ffns(model)[0].opts.model_dump()
    cfg = build_config(model.cfg, ffn_options={**opts, "layer_widths": per})
    small = type(model)(cfg).to(next(model.parameters()).device)
    state = model.state_dict()
    for name, p in small.state_dict().items():
        p.copy_(state[name][: p.shape[0]] if name.endswith(("w_gate", "w_up", "w_down")) else state[name])
    return small.train(model.training)
