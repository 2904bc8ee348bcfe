"""What every 2-D (image) token mixer shares: the grid it is given, and the q/k/v layout on it.

An image model flattens its (height, width) grid of patch tokens in row-major order and passes the
grid as ``positions.grid`` (:class:`~efformer.nn.positional.PositionalContext`); a 2-D mixer reads it
there and never guesses a shape from the sequence length. No mechanism is registered here.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.mixers.base import Mixer
from efformer.nn.positional import PositionalContext


class GridMixer(Mixer):
    """Base of 2-D mixers: ``grid_of`` checks the model's grid; ``qkv`` splits a fused projection."""

    # Contract-test lengths: 1x1, 3x5 and 5x7 grids (odd sides, windows that do not divide them).
    test_lengths: ClassVar[tuple[int, ...]] = (1, 15, 35)

    def grid_of(self, pos: PositionalContext, n: int) -> tuple[int, int]:
        """(height, width) of the token grid for a sequence of ``n`` tokens; a ShapeError without one."""
        grid = pos.grid
        if grid is None:
            raise ShapeError(f"{self.name}: this 2-D mixer needs the token grid, but positions carry none; call "
                             "it from an image model (e.g. create_model('vit-tiny', mixer=...)) or pass "
                             "PositionalContext(positions, grid=(height, width))")
        h, w = grid
        if h * w != n:
            raise ShapeError(f"{self.name}: grid {h}x{w} holds {h * w} tokens but the sequence has {n}; a 2-D mixer "
                             "takes exactly the patch tokens (no class token: use pooling='mean')")
        return h, w

    def build_qkv(self, bias: bool = True) -> None:
        """The fused q|k|v projection and the output projection most 2-D attention mixers use."""
        self.qkv = nn.Linear(self.d_model, 3 * self.d_model, bias=bias)
        self.out_proj = nn.Linear(self.d_model, self.d_model)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused q|k|v projection, and the output projection."""
        return {"value": [self.qkv.weight[2 * self.d_model :]], "output": [self.out_proj.weight]}

    def heads_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, n, d) -> q, k, v each (b, heads, n, head_dim)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)


def grid_coords(h: int, w: int, device=None) -> tuple[Tensor, Tensor]:
    """Row and column (n,) of each token of an h x w grid in row-major order."""
    idx = torch.arange(h * w, device=device)
    return idx // w, idx % w


def dense_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, bias: Tensor | None = None,
                    scale: float | None = None, dropout: float = 0.0) -> Tensor:
    """Plain softmax attention (b, h, n, d) with a bool (n, t) pattern and an additive (h, n, t) bias."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return F.dropout(scores.softmax(-1), dropout) @ v
