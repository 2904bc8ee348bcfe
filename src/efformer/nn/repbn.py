"""Re-parameterised BatchNorm and its progressive replacement of LayerNorm (PRepBN).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized
Batch Normalization" (Guo, Chen, Tang & Wang, ICML 2024).

- ``repbn``: RepBN(x) = BN(x) + alpha x, BatchNorm over the channels of every token (batch and
  sequence pooled) with a learned scalar alpha (1 at init), which keeps an identity path.
- ``prepbn``: gamma LN(x) + (1 - gamma) RepBN(x), gamma decaying linearly from 1 to 0 over the
  first ``warmup`` training steps (one step = one training-mode forward of this norm), then RepBN only.

At inference BatchNorm uses its running statistics, so RepBN is a per-channel affine map
``x * scale + shift``: :meth:`RepBN.folded` (and :func:`fold_repbn` for a whole model, once every
PRepBN has reached gamma = 0) replaces it by that affine, with no statistics computed at all.

Caveats (of the method, not this code): in training, batch statistics pool every token of the batch,
padding and future tokens included, so a causal model sees a little of other positions through the
norm until it is in eval mode; at inference the folded form is per token and exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError
from efformer.nn.norms import NormOptions
from efformer.registry import NORMS


class FoldedNorm(nn.Module):
    """A folded RepBN: (..., d) -> x * scale + shift, per channel."""

    def __init__(self, scale: Tensor, shift: Tensor):
        super().__init__()
        self.scale, self.shift = nn.Parameter(scale), nn.Parameter(shift)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d)."""
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


@NORMS.register("repbn")
class RepBN(nn.Module):
    """BN(x) + alpha x over the last dim of (..., d) tokens; a per-channel affine at inference."""

    Options = NormOptions

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm1d(d_model, eps=eps)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d); statistics over every token in training, running ones in eval."""
        flat = x.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] == 1:
            raise CapabilityError("repbn: BatchNorm needs more than one token per training step to estimate "
                                  "its statistics; train on batches of more than one token")
        return (self.bn(flat) + self.alpha.to(x.dtype) * flat).reshape(x.shape)

    @torch.no_grad()
    def affine(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) (d,) with RepBN(x) == x * scale + shift in eval mode."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
        return inv + self.alpha, bn.bias - bn.running_mean * inv

    def folded(self) -> FoldedNorm:
        """The eval-mode RepBN as a per-channel affine module."""
        return FoldedNorm(*(t.clone() for t in self.affine()))


@NORMS.register("prepbn")
class ProgressiveRepBN(nn.Module):
    """gamma LN(x) + (1 - gamma) RepBN(x), gamma = max(0, 1 - step / warmup): LayerNorm handed over to RepBN."""

    Options = NormOptions
    default_warmup = 10_000

    def __init__(self, d_model: int, warmup: int | None = None, eps: float = 1e-5):
        super().__init__()
        warmup = self.default_warmup if warmup is None else warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup <= 0:
            raise ConfigError("prepbn.warmup", warmup, "a positive number of training steps")
        self.warmup = warmup
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.repbn = RepBN(d_model, eps)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved, so a resumed run continues

    @property
    def gamma(self) -> float:
        """The LayerNorm weight at the current step (1 at the start, 0 from ``warmup`` on)."""
        return max(0.0, 1.0 - int(self.step) / self.warmup)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d); a training-mode call advances the schedule by one step."""
        g = self.gamma
        if self.training:
            self.step += 1
        y = self.repbn(x)
        return y if g == 0.0 else g * self.ln(x) + (1 - g) * y

    def folded(self) -> FoldedNorm:
        """The eval-mode norm as a per-channel affine (only once the LayerNorm share has reached zero)."""
        if self.gamma > 0:
            raise CapabilityError(f"prepbn: LayerNorm still has weight {self.gamma:.3g} at step {int(self.step)} "
                                  f"of {self.warmup}, and LayerNorm does not fold; train past the warmup first")
        return self.repbn.folded()


def fold_repbn(model: nn.Module) -> nn.Module:
    """Replace every RepBN / finished PRepBN in ``model`` (in eval mode) by its folded affine, in place."""
    if model.training:
        raise CapabilityError("fold_repbn: call model.eval() first; folding uses BatchNorm's running statistics")
    for name, child in list(model.named_children()):
        if isinstance(child, RepBN | ProgressiveRepBN):
            setattr(model, name, child.folded())
        else:
            fold_repbn(child)
    return model
