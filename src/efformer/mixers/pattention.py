"""TokenFormer attention: softmax attention whose q/k/v/output projections are Pattention layers.

Paper: "TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters" (Wang et al., 2024).

Token-token attention stays exact softmax attention (KV cache, forms, positional schemes and padding
are :class:`SoftmaxAttention`'s); every linear projection becomes token-parameter attention
(:class:`efformer.nn.pattention.Pattention`), so the layer grows by adding parameter tokens:
:meth:`TokenFormerAttention.grow` appends ones with zero-initialised keys and the outputs stay exactly the same.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from torch import Tensor

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.nn.pattention import Pattention
from efformer.registry import register_mixer


class TokenFormerOptions(SoftmaxOptions):
    """Options of TokenFormer attention (Pattention layers have no biases: qkv_bias must stay False)."""

    n_param_tokens: int = pydantic.Field(256, gt=0, description="key/value parameter tokens per projection")
    normalization: Literal["l2_gelu", "softmax"] = pydantic.Field(
        "l2_gelu", description="Theta: GeLU of L2-normalised scores times tau (the paper), or softmax",
    )
    scale: float | None = pydantic.Field(
        None, gt=0, description="tau; None = sqrt(n_param_tokens) (keep the old tau to rebuild a grown layer)",
    )


@register_mixer("tokenformer")
class TokenFormerAttention(SoftmaxAttention):
    """Softmax attention with Pattention projections (tokens attend to parameter tokens); grows without retraining."""

    capabilities = Capabilities(
        family="softmax",
        paper="TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=True,  # the token-token attention is exact softmax; only the projections differ
        time="O(N^2 d + N n_param d)",
        memory="O(N d + N n_param) fused (SDPA), O(N^2) reference",
        forms=("reference", "fast"),
        attention_bias=True,
        rotary=True,
    )
    Options = TokenFormerOptions
    test_options = {"n_param_tokens": 24, "n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        if o.qkv_bias:
            raise ConfigError(f"{self.name}.qkv_bias", True, "Pattention projections have no bias; leave it False")
        kv_dim = 2 * self.n_kv_heads * self.head_dim
        layer = lambda d_out: Pattention(d_model, d_out, o.n_param_tokens, o.normalization, o.scale)  # noqa: E731
        self.q_proj, self.kv_proj, self.out_proj = layer(d_model), layer(kv_dim), layer(d_model)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value columns of the k|v Pattention's value tokens, and the output Pattention's value tokens."""
        return {"value": [self.kv_proj.values[:, self.n_kv_heads * self.head_dim :]],
                "output": [self.out_proj.values]}

    def grow(self, n_new: int) -> None:
        """Add ``n_new`` parameter tokens with zero keys to every projection (outputs stay the same)."""
        for layer in (self.q_proj, self.kv_proj, self.out_proj):
            layer.grow(n_new)
