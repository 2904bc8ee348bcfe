"""MemoryFormer attention: softmax attention whose q/k/v/output projections are hash-lookup memory layers.

Paper: "MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected Layers" (Ding et
al., NeurIPS 2024).

The token-token attention is exact softmax attention (KV cache, forms, positional schemes and padding
are :class:`SoftmaxAttention`'s); the four projections are :class:`efformer.nn.hash_linear.HashLinear`
memory layers, so the layer has no matrix multiplication outside attention itself. Replacing the
output projection too is our reading of "removing fully-connected layers"; the paper's memory block
for the FFN is not part of this mixer.
"""

from __future__ import annotations

import pydantic
from torch import Tensor

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.nn.hash_linear import HashLinear
from efformer.registry import register_mixer


class MemoryFormerOptions(SoftmaxOptions):
    """Options of MemoryFormer attention (memory layers have no biases: qkv_bias must stay False)."""

    bits: int = pydantic.Field(8, ge=1, le=16, description="tau: dims per hashed chunk; 2^tau rows per table")
    temperature: float = pydantic.Field(1.0, gt=0, description="t in the bucket weight p(z) (our default)")


@register_mixer("memoryformer")
class MemoryFormerAttention(SoftmaxAttention):
    """Softmax attention with hash-bucket lookup tables in place of its linear projections."""

    capabilities = Capabilities(
        family="hashing",
        paper="MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected Layers",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=True,  # the token-token attention is exact softmax; only the projections are lookups
        time="O(N^2 d + N d^2 / tau) (lookups: d / tau rows of d per token and projection)",
        memory="O(N d) fused (SDPA), tables O(d^2 2^tau / tau) per projection",
        forms=("reference", "fast"),
        attention_bias=True,
        rotary=True,
    )
    Options = MemoryFormerOptions
    test_options = {"bits": 4, "n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        if o.qkv_bias:
            raise ConfigError(f"{self.name}.qkv_bias", True, "memory layers have no bias; leave it False")
        if d_model % o.bits:
            raise ConfigError(f"{self.name}.bits", o.bits,
                              f"must divide d_model={d_model} (inputs are hashed in chunks of bits)")
        kv_dim = 2 * self.n_kv_heads * self.head_dim
        layer = lambda d_out: HashLinear(d_model, d_out, o.bits, o.temperature)  # noqa: E731
        self.q_proj, self.kv_proj, self.out_proj = layer(d_model), layer(kv_dim), layer(d_model)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value columns of the k|v tables, and the output tables."""
        return {"value": [self.kv_proj.tables[..., self.n_kv_heads * self.head_dim :]],
                "output": [self.out_proj.tables]}
