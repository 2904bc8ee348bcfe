"""Auxiliary losses of conditional-compute parts (router balance, z-loss, depth predictors).

A module that has one sets ``self.aux_losses = {name: scalar tensor}`` (already weighted) in its
forward; the trainer calls :func:`collect_aux_losses` after each training forward and adds their sum
to the task loss, and logs each name.
"""

from __future__ import annotations

from torch import Tensor, nn


def collect_aux_losses(model: nn.Module, clear: bool = True) -> dict[str, Tensor]:
    """{name: summed over modules} of the ``aux_losses`` set by the last forward; cleared after reading, so
    a module the next forward skips cannot contribute a stale value."""
    out: dict[str, Tensor] = {}
    for module in model.modules():
        losses = getattr(module, "aux_losses", None)
        if not losses:
            continue
        for name, value in losses.items():
            out[name] = out[name] + value if name in out else value
        if clear:
            module.aux_losses = {}
    return out
