"""``efformer.reduce.apply(model, method, schedule)`` and ``remove(model)``: attach the reduction hook.

The hook works on every encoder efformer builds (text ``SequenceClassifier`` / ``DualEncoderClassifier``,
``ImageClassifier`` stacks of 1-D mixers) and refuses, with the reason, what cannot be reduced.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from efformer.errors import CapabilityError
from efformer.mixers.base import Mixer
from efformer.models.classifier import _Encoder
from efformer.models.depth import MoDBlock
from efformer.models.vision import ImageClassifier
from efformer.reduce.hook import Reducer, as_schedule
from efformer.reduce.methods import Method, get_method


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


def _check_blocks(stacks: list, method: Method, prop_attn: bool) -> None:
    for s, blocks in enumerate(stacks):
        for j, blk in enumerate(blocks):
            if isinstance(blk, MoDBlock):
                raise CapabilityError("Mixture-of-Depths blocks rebuild positions for the tokens they route, "
                                      "which merged tokens do not have; token reduction skips such models")
            mixer: Mixer = blk.mixer
            where = f"stack {s} block {j}: mixer {mixer.name!r}"
            if len(blocks) == 1:
                continue  # a one-block stack has no reduction point
            caps = mixer.capabilities
            if caps.grid:
                raise CapabilityError(f"{where} mixes a 2-D grid of patches, which merged tokens no longer form; "
                                      "token reduction runs on stacks of 1-D mixers (e.g. mixer='softmax')")
            if prop_attn and not caps.attention_bias:
                raise CapabilityError(f"{where} cannot take an additive score bias, so proportional attention "
                                      "(log-size on the keys) cannot reach it; pick a mixer with "
                                      "capabilities.attention_bias (softmax, ...) or pass prop_attn=False")
            if method.needs_attention and not hasattr(mixer, "qkv_heads"):
                raise CapabilityError(f"{where} forms no q and k, and method {method.name!r} needs the attention "
                                      "map; use 'tome' or 'pitome', which fall back to the tokens as metric")


def apply(model: nn.Module, method: str | Method = "tome", schedule: Any = 8, *, prop_attn: bool = True,
          **options: Any) -> Reducer:
    """Attach token reduction to ``model`` (in place) and return the hook; ``remove(model)`` undoes it.

    ``schedule``: int r per reduction point, a per-point list, or ``{'r': r, 'inflect': -1}`` /
    ``{'keep': 0.5}`` (see :class:`~efformer.reduce.hook.Schedule`); ``options`` go to the method.
    """
    target, stacks, protected = _target(model)
    m = get_method(method, **options)
    sched = as_schedule(schedule)
    _check_blocks(stacks, m, prop_attn)
    reducer = Reducer(m, sched, protected, [len(s) for s in stacks], prop_attn)
    remove(model)
    for blocks in stacks:
        for blk in blocks[:-1]:  # a stack's last block has no reduction point after it
            if hasattr(blk.mixer, "qkv_heads"):
                blk.mixer.record_qk = True  # the metric (keys) and attention map of this block
    if hasattr(m, "attach"):  # trainable methods and plug-ins (reduce.learned, reduce.cache) add their modules
        m.attach(model, stacks, reducer)
    target.reducer = reducer
    return reducer


def remove(model: nn.Module) -> None:
    """Detach token reduction: the model runs exactly as before ``apply``."""
    target, stacks, _ = _target(model)
    for blocks in stacks:
        for blk in blocks:
            blk.mixer.record_qk = False
            blk.mixer.last_qk = None
    getattr(getattr(target.reducer, "method", None), "detach", lambda _model: None)(model)
    target.reducer = None
