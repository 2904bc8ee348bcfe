"""The model-level decode cache: one mixer state per layer (of any kind) plus per-row positions."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from efformer.mixers.base import MixerState


@dataclass
class Cache:
    """Per-layer decode states and the next absolute position of each batch row (batch,)."""

    states: list[MixerState]
    next_position: Tensor

    def select(self, index: Tensor) -> Cache:
        """The cache of the batch rows in ``index`` (drops finished rows during generation)."""
        return Cache(
            states=[s.select(index) for s in self.states],
            next_position=self.next_position.index_select(0, index.to(self.next_position.device)),
        )

    @property
    def batch_size(self) -> int:
        """Number of rows the cache holds."""
        return self.next_position.shape[0]
