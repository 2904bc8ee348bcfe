"""The Transformer block ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``, with the norm placements
of the literature: pre-LN, post-LN, sandwich ("CogView: Mastering Text-to-Image Generation via
Transformers"), Peri-LN ("Peri-LN: Revisiting Normalization Layer in the Transformer
Architecture") and DeepNorm ("DeepNet: Scaling Transformers to 1,000 Layers")."""

from __future__ import annotations

from torch import Tensor, nn

from efformer.mixers.base import Mixer, MixerState, with_max_len
from efformer.models.config import ModelConfig
from efformer.registry import FFNS, MIXERS, NORMS


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """(alpha, beta) of DeepNet for an N-layer encoder-only or decoder-only stack."""
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


class Block(nn.Module):
    """One layer: token mixer and feed-forward, each a residual branch with its norms."""

    def __init__(self, cfg: ModelConfig, mixer_name: str, mixer_options: dict, rotary=None, attn_bias=None):
        super().__init__()
        self.placement = cfg.norm_placement
        mixer_cls = MIXERS.get(mixer_name)
        self.mixer: Mixer = mixer_cls(
            cfg.d_model,
            cfg.n_heads,
            causal=cfg.causal,
            options=with_max_len(mixer_cls, mixer_options, cfg.max_len),
            rotary=rotary,
            attn_bias=attn_bias,
            dropout=cfg.attn_dropout,
        )
        self.ffn = FFNS.get(cfg.ffn)(cfg.d_model, cfg.ffn_mult, cfg.dropout)
        norm = NORMS.get(cfg.norm)
        self.norm1, self.norm2 = norm(cfg.d_model), norm(cfg.d_model)
        if self.placement in ("peri", "sandwich"):
            self.out_norm1, self.out_norm2 = norm(cfg.d_model), norm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.alpha = 1.0
        if self.placement == "deepnorm":
            self.alpha, beta = deepnorm_constants(cfg.n_layers)
            _scale_branch_init(self.mixer, beta)
            _scale_branch_init(self.ffn, beta)

    def forward(
        self, x: Tensor, *, mask: Tensor | None, state: MixerState | None, positions: Tensor
    ) -> tuple[Tensor, MixerState | None]:
        """(b, n, d) -> (b, n, d), threading the mixer's decode state."""

        def mix(h):
            return self.mixer(h, mask=mask, state=state, positions=positions)

        p = self.placement
        if p == "pre":
            y, state = mix(self.norm1(x))
            x = x + self.drop(y)
            return x + self.drop(self.ffn(self.norm2(x))), state
        if p in ("peri", "sandwich"):
            y, state = mix(self.norm1(x))
            x = x + self.drop(self.out_norm1(y))
            return x + self.drop(self.out_norm2(self.ffn(self.norm2(x)))), state
        # post-LN and DeepNorm: normalise after the residual sum (DeepNorm up-weights the residual)
        y, state = mix(x)
        x = self.norm1(self.alpha * x + self.drop(y))
        return self.norm2(self.alpha * x + self.drop(self.ffn(x))), state


def _scale_branch_init(module: nn.Module, beta: float) -> None:
    """DeepNet init: scale value/output/FFN weights by beta; query and key projections keep theirs."""
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or name.split(".")[-1].startswith(("q_", "k_", "qk")):
            continue
        w = sub.weight.data
        if name.split(".")[-1] == "kv_proj":  # fused k|v: only the value half is scaled
            w[w.shape[0] // 2 :].mul_(beta)
        else:
            w.mul_(beta)
