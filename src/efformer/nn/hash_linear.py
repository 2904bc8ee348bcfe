"""MemoryFormer's memory layer: a linear map replaced by locality-sensitive-hash lookups in tables.

Paper: "MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected Layers" (Ding et
al., NeurIPS 2024).

The input x (d_in) is cut into K = d_in / tau chunks z_k of tau dims. Each chunk is hashed by the
signs of its coordinates to one of 2^tau buckets, h(z_k) = sum_j [z_kj > 0] 2^j, and the layer returns

    y = sum_k p(z_k) T_k[h(z_k)],   p(z_k) = exp(<sign z_k, z_k> / t) / sum_{s in {-1,1}^tau} exp(<s, z_k> / t),

a weighted sum of K rows of learned tables T_k (2^tau, d_out): no multiplication by a weight matrix.
The weight p makes the lookup differentiable in x; the tables get the gradient p(z_k) dL/dy at the
rows that were read, and zero elsewhere. The sum over all 2^tau sign vectors factorises, so
``log p = -sum_j softplus(-2 |z_kj| / t)`` (an identity the tests check against the explicit sum).

"fast" is ``F.embedding_bag`` (a gather and a weighted sum); :meth:`HashLinear.reference` is the same
lookup written as a one-hot (2^tau-wide) matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError


class HashLinear(nn.Module):
    """Memory layer: (..., d_in) -> (..., d_out) by sign-hash lookups of d_in / bits chunks in 2^bits-row tables."""

    def __init__(self, d_in: int, d_out: int, bits: int = 8, temperature: float = 1.0):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ConfigError("bits", bits, "an integer in [1, 16] (2^bits rows per table)")
        if d_in % bits:
            raise ConfigError("bits", bits, f"must divide the input width {d_in} (inputs are cut into chunks of bits)")
        if not temperature > 0:
            raise ConfigError("temperature", temperature, "a positive number")
        self.bits, self.chunks, self.temperature = bits, d_in // bits, float(temperature)
        # Each output sums `chunks` rows weighted by p <= 1; 1/sqrt(chunks) keeps it O(1) at init.
        self.tables = nn.Parameter(torch.randn(self.chunks, 2**bits, d_out) / self.chunks**0.5)
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)
        self.register_buffer("offsets", torch.arange(self.chunks) * 2**bits, persistent=False)

    @property
    def weight(self) -> Tensor:
        """The tables (chunks, 2^bits, d_out): the weights an init role (value, output) scales."""
        return self.tables

    def codes(self, x: Tensor) -> Tensor:
        """Bucket index h(z_k) (..., chunks) of every chunk: its sign pattern read as a binary number."""
        z = x.unflatten(-1, (self.chunks, self.bits))
        return ((z > 0).long() * self.powers).sum(-1)

    def probabilities(self, x: Tensor) -> Tensor:
        """p(z_k) (..., chunks): the softmax weight of the chunk's own bucket among all 2^bits sign vectors."""
        z = x.unflatten(-1, (self.chunks, self.bits))
        return torch.exp(-F.softplus(-2 * z.abs() / self.temperature).sum(-1))

    def reference(self, x: Tensor) -> Tensor:
        """The lookup as an explicit product with one-hot bucket indicators: sum_k p_k onehot(h_k) T_k."""
        onehot = F.one_hot(self.codes(x), 2**self.bits).to(x.dtype) * self.probabilities(x)[..., None]
        return torch.einsum("...kb,kbo->...o", onehot, self.tables.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out) by a gather of one row per chunk and their p-weighted sum."""
        flat = x.reshape(-1, x.shape[-1])
        idx = self.codes(flat) + self.offsets
        table = self.tables.to(x.dtype).flatten(0, 1)
        y = F.embedding_bag(idx, table, per_sample_weights=self.probabilities(flat).to(x.dtype), mode="sum")
        return y.reshape(*x.shape[:-1], y.shape[-1])
