"""Packed variable-length batches: several sequences laid end to end in one row, no pad waste.

The padding-free execution of "ByteTransformer: A High-Performance Transformer Boosted for
Variable-Length Inputs" and the packed prefill of "Prepacking: A Simple Method for Fast Prefilling
and Increased Throughput in Large Language Models": sequences are placed into rows of a fixed
capacity by first-fit decreasing; each carries a segment id, positions restart per segment, and
every mixer that declares ``capabilities.packing`` mixes tokens only within a segment. The unused
tail of a row is one padding segment (mask False), so it never meets a real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from efformer.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class Packed:
    """A packed batch: ids, segment ids (rows, capacity), keep-mask, and where each sequence sits."""

    ids: Tensor  # (rows, capacity) token ids
    segments: Tensor  # (rows, capacity) segment id, unique per sequence; -1 for the padding tail
    mask: Tensor  # (rows, capacity) bool keep-mask: False on the padding tail
    places: tuple[tuple[int, int, int], ...]  # per input sequence: (row, start, length)

    def unpack(self, out: Tensor) -> list[Tensor]:
        """Per-sequence slices (length, *) of a packed output (rows, capacity, *), in input order."""
        return [out[r, s : s + n] for r, s, n in self.places]


def pack_sequences(seqs: Sequence[Sequence[int] | Tensor], capacity: int | None = None, pad_id: int = 0,
                   device=None) -> Packed:
    """Pack token sequences into rows of ``capacity`` tokens (default: the longest sequence)."""
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) == 0:
        raise ShapeError("pack_sequences needs a non-empty list of non-empty sequences")
    capacity = max(lengths) if capacity is None else capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < max(lengths):
        raise ConfigError("capacity", capacity, f"an integer >= the longest sequence ({max(lengths)} tokens)")
    fill: list[int] = []  # tokens used per row
    places: list[tuple[int, int, int] | None] = [None] * len(seqs)
    for i in sorted(range(len(seqs)), key=lambda j: -lengths[j]):  # first-fit decreasing
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        places[i] = (row, fill[row], lengths[i])
        fill[row] += lengths[i]
    ids = torch.full((len(fill), capacity), pad_id, dtype=torch.long)
    segments = torch.full((len(fill), capacity), -1, dtype=torch.long)
    mask = torch.zeros(len(fill), capacity, dtype=torch.bool)
    for i, (r, s, n) in enumerate(places):
        ids[r, s : s + n] = torch.as_tensor(seqs[i], dtype=torch.long)
        segments[r, s : s + n], mask[r, s : s + n] = i, True
    return Packed(ids.to(device), segments.to(device), mask.to(device), tuple(places))


def packed_pairs(segments: Tensor, mask: Tensor) -> Tensor:
    """Bool (rows, capacity - 1): next-token pairs (t, t+1) inside one real segment (the LM loss terms)."""
    return mask[:, 1:] & mask[:, :-1] & (segments[:, 1:] == segments[:, :-1])
