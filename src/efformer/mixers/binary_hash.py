"""EcoFormer: attention in Hamming space, with binary codes from a learned kernelized hash.

Paper: "EcoFormer: Energy-Saving Attention with Linear Complexity" (Liu et al., 2022).

Queries and keys go through one shared hash: the unit-normalised vector x is mapped to RBF kernel
features against m anchor points, phi_a(x) = exp((x . a - 1) / sigma^2) (= exp(-|x - a|^2 / 2 sigma^2)
for unit x and a), and the code is h(x) = sign(phi(x) W + c) in {-1, +1}^b. The attention kernel is
the Hamming affinity of the codes, kappa(q, k) = 1 - Hamming(h(q), h(k)) / b = (1 + h(q) . h(k) / b) / 2,
which is a dot product of the (b + 1)-dim features [1/sqrt 2, h / sqrt(2 b)], so attention
``sum_j kappa_ij v_j / sum_j kappa_ij`` runs in linear time by associativity (the kernel-attention
forms of ``kernel.py``). kappa_ii = 1, so a query that sees itself never has an empty normaliser.

What we chose where the paper leaves room: the paper fits W (and samples anchors from data) by a
separate self-supervised step that matches code similarities to a trained model's attention; here
W and c are trained end to end with a straight-through estimator (forward sign, backward tanh),
and the anchors are a fixed random buffer on the unit sphere (:meth:`redraw_anchors`, or
:meth:`set_anchors` to sample them from real queries/keys as the paper does).
"""

from __future__ import annotations

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.mixers.base import Capabilities
from efformer.mixers.kernel import KernelAttention, KernelOptions
from efformer.registry import register_mixer


class EcoFormerOptions(KernelOptions):
    """Options of EcoFormer's binary-hash attention."""

    n_bits: int = pydantic.Field(16, ge=1, description="b: bits of the binary code of each query/key")
    n_anchors: int = pydantic.Field(32, ge=1, description="m: RBF anchor points of the kernelized hash")
    sigma: float = pydantic.Field(1.0, gt=0, description="RBF width on unit vectors: phi = exp((x.a - 1)/sigma^2)")


@register_mixer("ecoformer")
class EcoFormerAttention(KernelAttention):
    """EcoFormer: kernel attention whose kernel is 1 - Hamming(h(q), h(k)) / b of learned binary codes."""

    capabilities = Capabilities(
        family="hashing",
        paper="EcoFormer: Energy-Saving Attention with Linear Complexity",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N (m d + m b + b d))",
        memory="O(N (m + b) + N b d / chunk) chunked, O(b d) decode state",
        forms=("reference", "chunked", "recurrent"),
    )
    Options = EcoFormerOptions
    test_options = {"chunk": 4, "n_bits": 8, "n_anchors": 6}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        h, m, b = n_heads, self.opts.n_anchors, self.opts.n_bits
        self.register_buffer("anchors", F.normalize(torch.randn(h, m, self.head_dim), dim=-1))
        self.hash_weight = nn.Parameter(torch.randn(h, m, b) / m**0.5)
        self.hash_bias = nn.Parameter(torch.zeros(h, b))

    @property
    def n_features(self) -> int:
        """b + 1: a constant feature and the b code bits."""
        return self.opts.n_bits + 1

    @torch.no_grad()
    def redraw_anchors(self) -> None:
        """Draw new unit anchors (heads, m, head_dim) from the global torch seed."""
        self.anchors.copy_(F.normalize(torch.randn_like(self.anchors), dim=-1))

    @torch.no_grad()
    def set_anchors(self, x: Tensor) -> None:
        """Anchors sampled from real per-head vectors ``x`` (heads, count >= m, head_dim), as the paper does."""
        h, m, d = self.anchors.shape
        if x.dim() != 3 or x.shape[0] != h or x.shape[2] != d or x.shape[1] < m:
            raise ShapeError(f"ecoformer.set_anchors: x must be ({h}, >= {m}, {d}), got {tuple(x.shape)}")
        pick = torch.randperm(x.shape[1], device=x.device)[:m]
        self.anchors.copy_(F.normalize(x[:, pick], dim=-1))

    def codes(self, x: Tensor) -> Tensor:
        """Binary codes (batch, heads, seq, b) in {-1, +1} of x (batch, heads, seq, head_dim).

        The forward value is sign(); the gradient is that of tanh (straight-through estimator).
        """
        u = F.normalize(x, dim=-1)
        phi = torch.exp((torch.einsum("bhnd,hmd->bhnm", u, self.anchors.to(u.dtype)) - 1) / self.opts.sigma**2)
        z = torch.einsum("bhnm,hmc->bhnc", phi, self.hash_weight) + self.hash_bias[:, None]
        soft = torch.tanh(z)
        return soft + (torch.where(z >= 0, 1.0, -1.0).to(z.dtype) - soft).detach()

    def features(self, q, k, mask, state, pos):
        """[1/sqrt 2, h(x)/sqrt(2 b)] for x = q, k: their dot product is the Hamming affinity."""
        b = self.opts.n_bits

        def feat(x: Tensor) -> Tensor:
            c = self.codes(x) / (2 * b) ** 0.5
            return torch.cat([torch.full_like(c[..., :1], 0.5**0.5), c], -1)

        fq, fk = feat(q), feat(k)
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        return fq, fk

    def scores(self, q, k, fq, fk, mask, pos):
        """The definition written out: 1 - Hamming(h(q_i), h(k_j)) / b (0 at padded keys)."""
        hq, hk = self.codes(q), self.codes(k)
        # Bit c differs iff h_c(q) h_c(k) = -1; (1 - product) / 2 counts it and keeps the ST gradient.
        differ = (1 - hq[..., :, None, :] * hk[..., None, :, :]) / 2
        a = 1 - differ.mean(-1)
        if mask is not None:
            a = a * mask[:, None, None, :].to(a.dtype)
        return a
