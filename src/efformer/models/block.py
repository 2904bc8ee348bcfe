"""The Transformer block ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``, with the norm placements
of the literature: pre-LN, post-LN, sandwich ("CogView: Mastering Text-to-Image Generation via
Transformers"), Peri-LN ("Peri-LN: Revisiting Normalization Layer in the Transformer
Architecture") and DeepNorm ("DeepNet: Scaling Transformers to 1,000 Layers")."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from efformer.mixers.base import Mixer, MixerState
from efformer.models.config import ModelConfig
from efformer.nn.positional import PositionalContext
from efformer.registry import FFNS, MIXERS, NORMS


def norm_factory(cfg: ModelConfig):
    """The config's norm class, given ``cfg.norm_eps`` when it is set: width -> module."""
    norm = NORMS.get(cfg.norm)
    return norm if cfg.norm_eps is None else functools.partial(norm, eps=cfg.norm_eps)


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """(alpha, beta) of DeepNet for an N-layer encoder-only or decoder-only stack."""
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


class Block(nn.Module):
    """One layer: token mixer and feed-forward, each a residual branch with its norms."""

    # efformer.reduce's merge between the mixer and the FFN residuals (ToMe's placement): (x, mask) ->
    # (fewer tokens, their mask); None (the default) costs one attribute test per block
    reduce_mid = None

    def __init__(self, cfg: ModelConfig, mixer_name: str, mixer_options: dict, layer: int | None = None):
        super().__init__()
        self.placement = cfg.norm_placement
        self.mixer: Mixer = MIXERS.get(mixer_name)(
            cfg.d_model,
            cfg.layer_n_heads(layer),  # a pruned layer may have fewer heads
            causal=cfg.causal,
            options=mixer_options,
            dropout=cfg.attn_dropout,
            max_len=cfg.max_len,
        )
        self.ffn = build_ffn(cfg, layer)
        norm = norm_factory(cfg)
        self.norm1, self.norm2 = norm(cfg.d_model), norm(cfg.d_model)
        if self.placement in ("peri", "sandwich"):
            self.out_norm1, self.out_norm2 = norm(cfg.d_model), norm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.layer_scale is not None:  # CaiT / PoolFormer: per-channel scales of the two branches
            self.scale1 = nn.Parameter(torch.full((cfg.d_model,), cfg.layer_scale))
            self.scale2 = nn.Parameter(torch.full((cfg.d_model,), cfg.layer_scale))
        self.alpha = 1.0
        if self.placement == "deepnorm":
            self.alpha, beta = deepnorm_constants(cfg.n_layers)
            scale_deepnorm_init(self.mixer, self.ffn, beta)

    def forward(
        self, x: Tensor, *, mask: Tensor | None, state: MixerState | None, positions: PositionalContext
    ) -> tuple[Tensor, MixerState | None]:
        """(b, n, d) -> (b, n, d), threading the mixer's decode state."""

        def mix(h):
            return self.mixer(h, mask=mask, state=state, positions=positions)

        def ffn(h):  # conditional-compute FFNs (MoE) take the keep-mask, so padding takes no capacity
            if getattr(self.ffn, "takes_positions", False):  # PVT v2's Mix-FFN convolves the grid
                return self.ffn(h, positions=positions)
            return self.ffn(h, mask=mask) if getattr(self.ffn, "takes_mask", False) else self.ffn(h)

        def scaled(h, i):
            return h * getattr(self, f"scale{i}").to(h.dtype) if hasattr(self, "scale1") else h

        def mid(h):  # the FFN (and its mask) then runs on the reduced tokens
            nonlocal mask
            if self.reduce_mid is not None:
                h, mask = self.reduce_mid(h, mask)
            return h

        drop = live_dropout(self.drop)
        p = self.placement
        if p == "pre":
            y, state = mix(self.norm1(x))
            x = mid(x + drop(scaled(y, 1)))
            return x + drop(scaled(ffn(self.norm2(x)), 2)), state
        if p == "res_post":  # Swin V2: the branch output is normalised before the residual sum
            y, state = mix(x)
            x = mid(x + drop(scaled(self.norm1(y), 1)))
            return x + drop(scaled(self.norm2(ffn(x)), 2)), state
        if p in ("peri", "sandwich"):
            y, state = mix(self.norm1(x))
            x = mid(x + drop(self.out_norm1(y)))
            return x + drop(self.out_norm2(ffn(self.norm2(x)))), state
        # post-LN and DeepNorm: normalise after the residual sum (DeepNorm up-weights the residual)
        y, state = mix(x)
        x = mid(self.norm1(self.alpha * x + drop(y)))
        return self.norm2(self.alpha * x + drop(ffn(x))), state


def live_dropout(drop: nn.Dropout):
    """``drop`` when it changes its input (training, p > 0), else the identity: nn.Dropout returns its
    input unchanged at p = 0 or in eval, and skipping the module call saves per-step overhead in decoding."""
    return drop if drop.training and drop.p > 0 else _unchanged


def _unchanged(h: Tensor) -> Tensor:
    return h


def build_ffn(cfg: ModelConfig, layer: int | None = None) -> nn.Module:
    """The config's FFN; one with options (MoE) gets ``ffn_options`` and whether the model is causal."""
    cls = FFNS.get(cfg.ffn)
    extra = {} if cfg.ffn_bias is None else {"bias": cfg.ffn_bias}  # checked at config time: cls takes it
    if layer is not None and cfg.layer_ffn_hidden is not None:  # a pruned layer's width (checked: cls takes it)
        extra["hidden"] = cfg.layer_ffn_hidden[layer]
    if cls.Options.model_fields:
        return cls(cfg.d_model, cfg.ffn_mult, cfg.dropout, options=cfg.ffn_options, causal=cfg.causal, **extra)
    return cls(cfg.d_model, cfg.ffn_mult, cfg.dropout, **extra)


@torch.no_grad()
def scale_deepnorm_init(mixer: Mixer, ffn: nn.Module, beta: float) -> None:
    """DeepNet init: scale the mixer's declared value/output weights and every FFN weight matrix by beta."""
    roles = mixer.init_roles()
    for w in roles["value"] + roles["output"]:
        w.mul_(beta)
    for name, p in ffn.named_parameters():  # every weight matrix (MoE/MatFormer hold them as parameters)
        if p.dim() >= 2 and not name.startswith("router"):  # a router's scale sets routing, not the update
            p.mul_(beta)
