"""``efformer.reduce.apply(model, method, schedule)`` and ``remove(model)``: attach the reduction hook.

The hook works on every encoder efformer builds (text ``SequenceClassifier`` / ``DualEncoderClassifier``,
``ImageClassifier`` stacks of 1-D mixers, and Swin stages by merging inside their windows) and refuses,
with the reason, what cannot be reduced.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import pydantic
from torch import nn

from efformer.errors import CapabilityError
from efformer.mixers.base import Mixer
from efformer.models.classifier import _Encoder
from efformer.models.depth import MoDBlock
from efformer.models.vision import ImageClassifier
from efformer.reduce.cluster import ClusterHook, ClusterOptions
from efformer.reduce.hook import ReduceError, Reducer, as_schedule
from efformer.reduce.methods import Method, ToMe, get_method
from efformer.reduce.windowed import WindowedToMe, has_windows

Where = Literal["mid", "between"]


def _target(model: nn.Module) -> tuple[nn.Module, list, int]:
    """(the module that calls the hook, its stacks of blocks, how many leading tokens are protected)."""
    if isinstance(model, ImageClassifier):
        cfg = model.cfg
        if cfg.positional == "cpe":
            raise CapabilityError("positional='cpe' reshapes the tokens to their grid after each stage's first "
                                  "block, which merged tokens no longer fill; use learned or sincos2d positions")
        return model, list(model.stages), model.n_extra
    if isinstance(model, _Encoder):
        cfg = model.cfg
        if cfg.causal or cfg.encoder_causal:
            raise CapabilityError(f"{type(model).__name__} is causal: a merged token averages tokens from "
                                  "different positions, so a later token's information reaches earlier ones and "
                                  "causality breaks; reduce only bidirectional encoders")
        if cfg.exit_layers:
            raise CapabilityError("early-exit heads pool hidden states of the full length after their layers; "
                                  "token reduction changes that length, so build the model without exit_layers")
        return model.backbone, [list(model.backbone.blocks)], int(cfg.pooling == "cls")
    if getattr(getattr(model, "cfg", None), "causal", False):
        raise CapabilityError(f"{type(model).__name__} is a causal language model: merging averages tokens from "
                              "different positions, which breaks causality (and the KV cache); token reduction "
                              "is for encoders (SequenceClassifier, DualEncoderClassifier, ImageClassifier)")
    raise CapabilityError(f"token reduction needs an efformer encoder (SequenceClassifier, DualEncoderClassifier, "
                          f"ImageClassifier), got {type(model).__name__}")


def _windowed(stacks: list, method: Method, where: str) -> list[bool]:
    """Which stacks merge inside windows (their blocks are Swin's); refuses what windowed merging cannot do."""
    flags = []
    for s, blocks in enumerate(stacks):
        win = [has_windows(blk.mixer) for blk in blocks]
        if any(win) and not all(win):
            raise CapabilityError(f"stack {s} mixes window attention with other mixers; windowed merging undoes "
                                  "each merge inside its block and needs every block of the stack to be 'swin'")
        if any(win) and where != "mid":
            raise CapabilityError(f"stack {s} uses window attention, whose next block (shifted windows) and patch "
                                  "merging need the full grid: merge inside each window between attention and MLP "
                                  "with where='mid'")
        if any(win) and type(method) is not ToMe:
            raise CapabilityError(f"stack {s} uses window attention: windowed merging matches tokens with ToMe's "
                                  f"bipartite rule inside each window; method {method.name!r} ranks tokens over "
                                  "the whole grid. Use method='tome'")
        flags.append(all(win) and bool(win))
    return flags


def _check_blocks(stacks: list, method: Method, prop_attn: bool, where: str, windowed: list[bool]) -> None:
    for s, blocks in enumerate(stacks):
        for j, blk in enumerate(blocks):
            if isinstance(blk, MoDBlock):
                raise CapabilityError("Mixture-of-Depths blocks rebuild positions for the tokens they route, "
                                      "which merged tokens do not have; token reduction skips such models")
            if getattr(blk, "lpi", None) is not None:
                raise CapabilityError(f"stack {s} block {j}: XCiT's local patch interaction convolves the patch "
                                      "grid, which merged tokens no longer form; token reduction skips stages "
                                      "with lpi=True")
            mixer: Mixer = blk.mixer
            where_ = f"stack {s} block {j}: mixer {mixer.name!r}"
            if where == "mid" and getattr(blk.ffn, "takes_positions", False):
                raise CapabilityError(f"stack {s} block {j}: FFN {type(blk.ffn).__name__} convolves the token grid, "
                                      "which merged tokens no longer fill; use where='between' (the FFN then runs "
                                      "before each merge) or a pointwise FFN")
            if windowed[s] or (len(blocks) == 1 and where == "between"):
                continue  # windowed blocks attend on the full grid; a one-block stack has no point between
            caps = mixer.capabilities
            if caps.grid:
                raise CapabilityError(f"{where_} mixes a 2-D grid of patches, which merged tokens no longer form; "
                                      "token reduction runs on stacks of 1-D mixers (e.g. mixer='softmax') and "
                                      "merges inside the windows of 'swin' stages")
            if prop_attn and not caps.attention_bias:
                raise CapabilityError(f"{where_} cannot take an additive score bias, so proportional attention "
                                      "(log-size on the keys) cannot reach it; pick a mixer with "
                                      "capabilities.attention_bias (softmax, ...) or pass prop_attn=False")
            if method.needs_attention and not hasattr(mixer, "qkv_heads"):
                raise CapabilityError(f"{where_} forms no q and k, and method {method.name!r} needs the attention "
                                      "map; use 'tome' or 'pitome', which fall back to the tokens as metric")


def apply(model: nn.Module, method: str | Method = "tome", schedule: Any = 8, *, prop_attn: bool = True,
          where: Where | None = None, **options: Any) -> Reducer:
    """Attach token reduction to ``model`` (in place) and return the hook; ``remove(model)`` undoes it.

    ``schedule``: int r per reduction point, a per-point list, or ``{'r': r, 'inflect': -1}`` /
    ``{'keep': 0.5}`` (see :class:`~efformer.reduce.hook.Schedule`); ``options`` go to the method.
    ``where``: ``"mid"`` merges inside every block between the mixer and the FFN (ToMe's placement: one
    point per block), ``"between"`` after every block but the last of each stack; None takes the method's
    ``default_where`` (mid, except the trainable LTM / IA-RED², whose modules sit between blocks). Swin stages merge r
    tokens inside each window of every block (``"mid"`` only; see :mod:`efformer.reduce.windowed`).
    """
    target, stacks, protected = _target(model)
    m = get_method(method, **options)
    where = m.default_where if where is None else where
    if where not in ("mid", "between"):
        raise ReduceError("where", where, "'mid' (between each block's mixer and FFN, as ToMe) or 'between' "
                          "(after every block but the last of each stack)")
    sched = as_schedule(schedule)
    windowed = _windowed(stacks, m, where)
    _check_blocks(stacks, m, prop_attn, where, windowed)
    if any(windowed):
        m = WindowedToMe(**m.opts.model_dump())
    reducer = Reducer(m, sched, protected, [len(s) for s in stacks], prop_attn, where, windowed)
    remove(model)
    for blocks in stacks:
        for j, blk in enumerate(blocks if where == "mid" else blocks[:-1]):  # the blocks with a point
            if hasattr(blk.mixer, "qkv_heads"):
                blk.mixer.record_qk = True  # the metric (keys) and attention map of this block
            if where == "mid":
                blk.reduce_mid = functools.partial(reducer.mid, blocks, j)
    if hasattr(m, "attach"):  # trainable methods and plug-ins (reduce.learned, reduce.cache) add their modules
        m.attach(model, stacks, reducer)
    target.reducer = reducer
    return reducer


def cluster_apply(model: nn.Module, clusters: tuple[int, int], at: int, until: int | None = None,
                  **options: Any) -> ClusterHook:
    """Expediting-ViT on a one-stage image model (in place): cluster the grid into ``clusters`` after block
    ``at``, reconstruct it after block ``until`` (None: the last); ``remove(model)`` undoes it. Options:
    :class:`~efformer.reduce.cluster.ClusterOptions`."""
    if not isinstance(model, ImageClassifier) or len(model.stages) != 1:
        got = type(model).__name__ + (" with stages" if isinstance(model, ImageClassifier) else "")
        raise CapabilityError(f"token clustering runs on one-stage image models (vit-tiny, deit-tiny), got {got}; "
                              "use efformer.reduce.apply for text and staged models")
    if model.cfg.positional in ("rope2d", "cpe"):
        raise CapabilityError(f"positional={model.cfg.positional!r} is applied to the grid inside the blocks, which "
                              "cluster tokens do not form; use learned or sincos2d positions")
    try:
        opts = ClusterOptions(clusters=clusters, at=at, until=until, **options)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise ReduceError(".".join(map(str, err["loc"])) or "options", err.get("input"), err["msg"]) from None
    blocks = model.stages[0]
    depth = len(blocks)
    if not at < depth:
        raise ReduceError("at", at, f"the model has {depth} blocks: cluster after block 1 .. {depth - 1}")
    if until is not None and not at < until <= depth:
        raise ReduceError("until", until, f"reconstruct after a block in {at + 1} .. {depth} (after at={at})")
    _check_blocks([list(blocks)], ToMe(), False, "between", [False])
    remove(model)
    hook = ClusterHook(opts, model.n_extra, depth)
    model.reducer = hook
    return hook


def remove(model: nn.Module) -> None:
    """Detach token reduction: the model runs exactly as before ``apply``."""
    target, stacks, _ = _target(model)
    for blocks in stacks:
        for blk in blocks:
            blk.mixer.record_qk = False
            blk.mixer.last_qk = None
            blk.reduce_mid = None
    getattr(getattr(target.reducer, "method", None), "detach", lambda _model: None)(model)
    target.reducer = None
