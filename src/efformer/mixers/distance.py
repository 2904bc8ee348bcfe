"""Lipschitz-regularised distance attention: L2 (negative squared distance) scores and a contractive bound.

Paper: "Mitigating Transformer Overconfidence via Lipschitz Regularization" (LRFormer, UAI 2023),
which replaces the dot product by a distance and bounds the layer's Lipschitz constant. The
distance attention and the bound used here are those of "The Lipschitz Constant of Self-Attention"
(Kim, Papamakarios & Mnih, ICML 2021), on which LRFormer builds; we use that formulation (our choice,
not LRFormer's exact layer) because its bound is a theorem we can state and test:

    P^h_ij = softmax_j(-||x_i W^{Q,h} - x_j W^{Q,h}||^2 / sqrt(D/H))      (queries and keys tied)
    F(X) = [P^1 X A^1 W^{V,1}, ..., P^H X A^H W^{V,H}] W^O,   A^h = W^{Q,h} W^{Q,h}^T / sqrt(D/H)

    Lip_2(F) <= sqrt(N) / sqrt(D/H) * (4 W0((N - 1) / e) + 1) * sqrt(sum_h ||W^{Q,h}||^2 ||W^{V,h}||^2) ||W^O||

(W0 the Lambert function: phi^{-1}(N - 1) for phi(x) = x exp(x + 1); 2-norms). With ``contractive``
(default) the output is divided by this bound for each row's count N of real tokens, so the layer is
1-Lipschitz in the Frobenius norm of the sequence: ||F(X) - F(X')|| <= ||X - X'||. Tied queries and
keys are what make L2 attention Lipschitz at all (dot-product attention is not).

Forms: "reference" forms every difference x_i - x_j; "fast" expands ||q_i - q_j||^2 = ||q_i||^2
- 2 q_i.q_j + ||q_j||^2, drops the per-row constant ||q_i||^2 (softmax ignores it) and runs
``scaled_dot_product_attention`` with scale 2 / sqrt(D/H) and the key bias -||q_j||^2 / sqrt(D/H).
Bidirectional only: the bound is for attention over the whole set (a causal map would need a bound
per prefix that grows with the length, and decoding cannot know the final length).
"""

from __future__ import annotations

import math

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.mixers.base import Capabilities, Mixer, MixerOptions
from efformer.registry import register_mixer


def lambert_w0(z: Tensor) -> Tensor:
    """The principal branch W0(z) for z >= 0 (w e^w = z), by Newton's method in float64."""
    z = z.to(torch.float64)
    w = torch.log1p(z)  # a starting point within a factor ~2 of the root for every z >= 0
    for _ in range(30):
        ew = torch.exp(w)
        w = w - (w * ew - z) / (ew * (w + 1))
    return w


class DistanceOptions(MixerOptions):
    """Options of Lipschitz distance attention."""

    contractive: bool = pydantic.Field(
        True, description="divide the output by its Lipschitz bound, making the layer 1-Lipschitz",
    )


@register_mixer("l2_attention")
class L2Attention(Mixer):
    """Tied-weight L2 distance attention with the Kim et al. Lipschitz bound (contractive by default), O(N^2 d)."""

    capabilities = Capabilities(
        family="softmax",
        paper="Mitigating Transformer Overconfidence via Lipschitz Regularization",
        causal=False,
        bidirectional=True,
        padding_mask=True,
        decode=False,
        exact=False,
        time="O(N^2 d + d^3) (the d^3: spectral norms of the weights, once per call)",
        memory="O(N d) fused (SDPA), O(N^2 d) reference",
        forms=("reference", "fast"),
    )
    Options = DistanceOptions

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)  # W^Q = W^K (tied: required for Lipschitzness)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The value projection and the output projection."""
        return {"value": [self.v_proj.weight], "output": [self.out_proj.weight]}

    def lipschitz_bound(self, n: Tensor | int) -> Tensor:
        """The bound on Lip_2 of the un-scaled layer over sequences of ``n`` tokens (a tensor of counts or an int)."""
        h, dh = self.n_heads, self.head_dim
        wq = self.q_proj.weight.float().reshape(h, dh, self.d_model)
        wv = self.v_proj.weight.float().reshape(h, dh, self.d_model)
        two = lambda w: torch.linalg.matrix_norm(w, ord=2)  # noqa: E731  (largest singular value)
        weights = torch.sqrt((two(wq).square() * two(wv).square()).sum()) * two(self.out_proj.weight.float())
        n = torch.as_tensor(n, device=wq.device)
        count = (n.to(torch.float64).sqrt() / math.sqrt(dh)) * (4 * lambert_w0((n - 1).clamp_min(0) / math.e) + 1)
        return count.to(weights.dtype) * weights

    # ---- shared parts ---------------------------------------------------------------------
    def _project(self, x: Tensor):
        """q (b, h, n, dh) and the values P-ready: v^h = x A^h W^{V,h} = q^h (W^{Q,h}^T W^{V,h}) / sqrt(dh)."""
        h, dh = self.n_heads, self.head_dim
        q = self.split_heads(self.q_proj(x))
        wq = self.q_proj.weight.reshape(h, dh, self.d_model)
        wv = self.v_proj.weight.reshape(h, dh, self.d_model)
        v = q @ (wq @ wv.transpose(-1, -2)).to(q.dtype) / math.sqrt(dh)
        return q, v

    def _finish(self, o: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        y = self.out_proj(self.merge_heads(o))
        if not self.opts.contractive:
            return y
        n = mask.sum(1) if mask is not None else torch.full((x.shape[0],), x.shape[1], device=x.device)
        return y / self.lipschitz_bound(n).to(y.dtype)[:, None, None]

    @staticmethod
    def _allowed(mask: Tensor | None) -> Tensor | None:
        """(b, 1, n, n) allowed pairs: real queries see real keys; padded queries see all (their output is dropped)."""
        if mask is None:
            return None
        return mask[:, None, None, :] | ~mask[:, None, :, None]

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Every difference q_i - q_j written out, squared distances, softmax, times the values."""
        q, v = self._project(x)
        dist = (q[..., :, None, :] - q[..., None, :, :]).square().sum(-1)
        scores = -dist / math.sqrt(self.head_dim)
        allowed = self._allowed(mask)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self._finish(p @ v, x, mask), state

    def forward_fast(self, x, *, mask, state, pos):
        """SDPA on 2 q_i.q_j / sqrt(dh) with the key bias -||q_j||^2 / sqrt(dh) (||q_i||^2 cancels in softmax)."""
        q, v = self._project(x)
        bias = (-q.square().sum(-1) / math.sqrt(self.head_dim))[:, :, None, :]  # (b, h, 1, n)
        allowed = self._allowed(mask)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        o = F.scaled_dot_product_attention(q, q, v, attn_mask=bias, scale=2 / math.sqrt(self.head_dim),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self._finish(o, x, mask), state
