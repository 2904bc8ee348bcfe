"""SLAB's simplified linear attention (SLA): ReLU kernel attention plus a depthwise convolution of the values.

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized
Batch Normalization" (Guo, Chen, Tang & Wang, ICML 2024). The paper's other half, PRepBN (LayerNorm
replaced progressively by a re-parameterised BatchNorm that folds at inference), is a norm:
``norm="prepbn"`` / ``"repbn"`` in :mod:`efformer.nn.repbn`.

    O = ReLU(Q) (ReLU(K)^T V) / (ReLU(Q) sum_j ReLU(K_j)) + DWC(V)

The depthwise convolution restores the local detail (and rank) a ReLU kernel loses; its weights
are shared by the heads (one filter per head channel, as in the paper's code). The paper's models
are vision models with a 3x3-style 2-D convolution over the image; on token sequences it is a 1-D
convolution of width ``conv_kernel`` over the sequence: centred when bidirectional (odd width), over
the current and previous tokens when causal (our choice: it keeps SLA causal and decodable). The
kernel-attention part has every form of :class:`KernelAttention` (explicit matrix, chunked,
recurrent); the convolution is one shared exact operation, carried across calls by a window of the
last ``conv_kernel - 1`` values in the decode state.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.base import Capabilities
from efformer.mixers.kernel import KernelAttention, KernelOptions, KernelState
from efformer.registry import register_mixer


@dataclass
class SLAState(KernelState):
    """Running sums of the ReLU kernel plus the last conv_kernel - 1 values (batch, heads, k - 1, head_dim)."""

    window: Tensor


class SLAOptions(KernelOptions):
    """Options of simplified linear attention."""

    conv_kernel: int = pydantic.Field(
        5, ge=1, le=63, description="width of the depthwise convolution over the values (odd when bidirectional)",
    )


def depthwise_conv(v: Tensor, weight: Tensor, bias: Tensor, causal: bool, window: Tensor | None) -> Tensor:
    """DWC over the sequence of v (b, h, n, d), weight (d, k), bias (d); ``window`` (b, h, k - 1, d) are the
    values before v (causal; zeros if None). Causal output i sees v_{i-k+1..i}; bidirectional v_{i-k//2..i+k//2}."""
    k = weight.shape[1]
    if causal:
        left = window if window is not None else v.new_zeros(*v.shape[:2], k - 1, v.shape[3])
        padded = torch.cat([left, v], 2)
    else:
        padded = F.pad(v, (0, 0, k // 2, k // 2))
    b, h = v.shape[:2]
    y = F.conv1d(rearrange(padded, "b h t d -> (b h) d t"), weight[:, None].to(v.dtype), bias.to(v.dtype),
                 groups=weight.shape[0])
    return rearrange(y, "(b h) d n -> b h n d", b=b, h=h)


@register_mixer("sla")
class SimplifiedLinearAttention(KernelAttention):
    """SLAB's SLA: ReLU(Q)(ReLU(K)^T V) row-normalised, plus a depthwise conv of V; O(N d^2)."""

    capabilities = Capabilities(
        family="kernel",
        paper="SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized "
              "Batch Normalization",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N d^2 + N d k)",
        memory="O(N d + N d^2 / chunk) chunked, O(d^2 + k d) decode state",
        forms=("reference", "chunked", "recurrent"),
    )
    Options = SLAOptions
    test_options = {"chunk": 4, "conv_kernel": 3}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        k = self.opts.conv_kernel
        if not self.causal and k % 2 == 0:
            raise ConfigError(f"{self.name}.conv_kernel", k, "must be odd for a bidirectional layer (a centred window)")
        self.dwc_weight = nn.Parameter(torch.randn(self.head_dim, k) / k**0.5)
        self.dwc_bias = nn.Parameter(torch.zeros(self.head_dim))

    @property
    def n_features(self) -> int:
        """m = head_dim."""
        return self.head_dim

    def features(self, q, k, mask, state, pos):
        """ReLU of q and k; phi(k) zero at pads."""
        fk = F.relu(k)
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        return F.relu(q), fk

    def init_state(self, batch, device, dtype) -> SLAState:
        """Zero running sums and a zero value window (causal layers only: a centred convolution reads ahead)."""
        if not self.causal:
            raise CapabilityError("sla: a bidirectional (causal=False) layer has no decode state; use causal=True")
        st = super().init_state(batch, device, dtype)
        window = torch.zeros(batch, self.n_heads, self.opts.conv_kernel - 1, self.head_dim, device=device, dtype=dtype)
        return SLAState(s=st.s, z=st.z, window=window)

    def mix_values(self, o: Tensor, v: Tensor, state) -> Tensor:
        """o + DWC(v), continuing the decode state's value window."""
        if state is not None and not self.causal:
            raise CapabilityError("sla: a bidirectional (causal=False) layer has no decode state; use causal=True")
        window = state.window if state is not None else None
        y = depthwise_conv(v, self.dwc_weight, self.dwc_bias, self.causal, window)
        if state is not None:
            keep = self.opts.conv_kernel - 1
            history = torch.cat([window, v], 2)
            state.window = history[:, :, history.shape[2] - keep :]
        return o + y
