"""Cross-covariance attention (XCA): attention between channels instead of between tokens.

Paper: "XCiT: Cross-Covariance Image Transformers" (El-Nouby et al., 2021).

Per head, q and k (n, d_h) are L2-normalised along the tokens, so each channel is a unit vector over
the sequence; A = softmax(tau_h * q^T k) is a (d_h, d_h) map between channels, with a learned
temperature tau_h per head; the output is v A^T, linear in the number of tokens. XCA itself never
looks at the grid (XCiT's local patch interaction, a depthwise convolution in the block, is not part
of this mixer), so it also serves 1-D sequences; padded tokens are zeroed before the norms, so they
change nothing. The mechanism is linear as the paper writes it, so there is one form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.mixers.base import Capabilities, Mixer
from efformer.nn.positional import PositionalContext
from efformer.registry import register_mixer


@register_mixer("xca")
class CrossCovarianceAttention(Mixer):
    """XCiT cross-covariance attention: (b, n, d) -> (b, n, d) through a (d_h, d_h) map per head."""

    capabilities = Capabilities(
        family="channel", paper="XCiT: Cross-Covariance Image Transformers",
        causal=False, bidirectional=True, padding_mask=True, decode=False, exact=False,
        time="O(N d^2 / h)", memory="O(N d + d^2 / h)", forms=("reference",),
    )

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        d = self.d_model
        self.qkv, self.out_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.temperature = nn.Parameter(torch.ones(self.n_heads, 1, 1))

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused q|k|v projection, and the output projection."""
        return {"value": [self.qkv.weight[2 * self.d_model :]], "output": [self.out_proj.weight]}

    def forward_reference(self, x, *, mask, state, pos):
        """Normalise q, k per channel over the real tokens; softmax over the channel map; apply it to v."""
        q, k, v = self.qkv(x).chunk(3, -1)
        if mask is not None:
            keep = mask[..., None].to(x.dtype)
            q, k, v = q * keep, k * keep, v * keep
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (b, h, n, d_h)
        q, k = F.normalize(q, dim=-2), F.normalize(k, dim=-2)
        attn = (q.transpose(-1, -2) @ k) * self.temperature  # (b, h, d_h, d_h): channel i of q vs channel j of k
        attn = F.dropout(attn.softmax(-1), self.dropout if self.training else 0.0)
        return self.out_proj(self.merge_heads(v @ attn.transpose(-1, -2))), None


class LocalPatchInteraction(nn.Module):
    """XCiT's LPI branch: (b, k + h*w, d) -> (b, k + h*w, d); the grid gets dwconv3x3-GELU-BN-dwconv3x3, the
    ``k`` leading (class) tokens get zeros. Zero padding at the borders, as the paper's convolutions."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model)
        self.norm = nn.BatchNorm2d(d_model, eps=eps)  # the paper's; per-channel affine at inference
        self.conv2 = nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model)

    def forward(self, x: Tensor, positions: PositionalContext | None, *, form: str = "fast") -> Tensor:
        """The update for every token; ``form="reference"`` runs the convolutions as per-pixel loops."""
        b, n, d = x.shape
        grid = None if positions is None else positions.grid
        if grid is None or not 0 <= n - grid[0] * grid[1] <= 2:
            raise ShapeError(f"local patch interaction convolves the patch grid, but got {n} tokens with grid {grid}; "
                             "it runs in an image model's XCiT block (stages[i].lpi=True), with at most the class "
                             "and distillation tokens before the grid")
        h, w = grid
        k = n - h * w
        g = x[:, k:].transpose(1, 2).reshape(b, d, h, w)
        conv = _depthwise_loop if form == "reference" else (lambda m, t: m(t))
        g = conv(self.conv2, self.norm(F.gelu(conv(self.conv1, g))))
        return torch.cat([x.new_zeros(b, k, d), g.flatten(2).transpose(1, 2)], 1)


def _depthwise_loop(conv: nn.Conv2d, g: Tensor) -> Tensor:
    """A depthwise 3x3 zero-padded conv written out: out[r, c] = bias + sum of w[i, j] * g[r + i - 1, c + j - 1]."""
    b, d, h, w = g.shape
    weight = conv.weight[:, 0]  # (d, 3, 3)
    out = torch.zeros_like(g)
    for r in range(h):
        for c in range(w):
            acc = conv.bias.expand(b, d)
            for i in range(3):
                for j in range(3):
                    rr, cc = r + i - 1, c + j - 1
                    if 0 <= rr < h and 0 <= cc < w:  # outside the grid the padding is zero
                        acc = acc + weight[:, i, j] * g[:, :, rr, cc]
            out[:, :, r, c] = acc
    return out
