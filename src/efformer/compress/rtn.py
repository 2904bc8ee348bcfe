"""Round-to-nearest (RTN) weight quantization: the baseline every PTQ paper compares with.

Each weight row (or group of a row) gets min/max (asymmetric) or absmax (symmetric) scales and every
entry is rounded to the nearest code, with no error feedback ("GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Frantar et al., 2023, calls it the RTN baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from efformer.compress.formats import IntFormat, int_decode, int_encode, int_qparams, int_qparams_clipped


@dataclass
class QuantizedWeight:
    """Integer codes (out, in) with scales/zeros (out, n_groups) and, after act-order, the group of each
    input column ``g_idx`` (in,); ``dequantize()`` gives the float weight."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    fmt: IntFormat
    g_idx: Tensor | None = None

    def dequantize(self) -> Tensor:
        """The float weight (out, in) these codes stand for."""
        if self.g_idx is None:
            return int_decode(self.codes, self.scale, self.zero, self.fmt)
        s, z = self.scale[:, self.g_idx], self.zero[:, self.g_idx]
        return (self.codes.to(s.dtype) - z) * s

    def column_groups(self) -> Tensor:
        """The group of each input column (in,)."""
        n_in = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx
        if self.fmt.granularity == "group":
            return torch.arange(n_in) // self.fmt.group_size
        return torch.zeros(n_in, dtype=torch.long)


def weight_format(bits: int, group_size: int, symmetric: bool) -> IntFormat:
    """The integer format of a weight: signed when symmetric, unsigned with a zero point otherwise
    (as GPTQ and torchao store them); per-channel for group_size -1."""
    grain = "group" if group_size > 0 else "channel"
    return IntFormat(bits, signed=symmetric, symmetric=symmetric, granularity=grain, group_size=group_size)


@torch.no_grad()
def rtn_quantize(w: Tensor, fmt: IntFormat, mse_clip: bool = False) -> QuantizedWeight:
    """RTN of a weight (out, in) in ``fmt``; ``mse_clip`` searches a clipped range per row/group."""
    w = w.detach().float()
    scale, zero = (int_qparams_clipped if mse_clip else int_qparams)(w, fmt)
    return QuantizedWeight(int_encode(w, scale, zero, fmt), scale, zero, fmt)
