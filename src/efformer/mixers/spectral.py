"""Spectral token mixing: Fourier transforms in place of attention.

Papers: "FNet: Mixing Tokens with Fourier Transforms" (Lee-Thorp, Ainslie, Eckstein & Ontanon, 2021)
and "SpectFormer: Frequency and Attention is what you need in a Vision Transformer" (Patro, Namboodiri
& Agneeswaran, 2023), whose spectral layer is the global filter of "Global Filter Networks for Image
Classification" (Rao et al., 2021).

- ``fnet``: y = Re(DFT_seq(DFT_hidden(x))), no parameters. Reference: the explicit (n x n) and
  (d x d) DFT matrices; fast: ``torch.fft.fft2``.
- ``spectral_gating``: per channel, y = irfft(W * rfft(x)) over the sequence, with a learned complex
  filter W of max_len // 2 + 1 frequencies per channel: a global circular convolution of length
  max_len applied to the zero-padded sequence. Reference: the kernel k = irfft(W) materialised as the
  explicit (n x n) circulant matrix k[(i - j) mod max_len]; fast: the FFT product.
  SpectFormer's "spectral-then-attention" architecture is a per-layer mixer list in the model config,
  e.g. ``mixer=["spectral_gating"] * 2 + ["softmax"] * 4``.

Both mix every position with every other (past and future), so they are bidirectional only: no
causal form exists in either paper. Padding: pads are zeroed before mixing, so pad *content* never
reaches real outputs, but the length n of the DFT (FNet) does include the pads.
The FFTs run in float32 (``torch.fft`` has no bfloat16 on CPU) and cast back.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions
from efformer.registry import register_mixer


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def dft_matrix(n: int, device=None, dtype=torch.complex128) -> Tensor:
    """The (n, n) DFT matrix F[k, j] = exp(-2 pi i k j / n) (unnormalised, as ``torch.fft.fft``)."""
    idx = torch.arange(n, device=device, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(idx, idx) / n).to(dtype)


def _zero_pads(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask[..., None].to(x.dtype)


class FNetOptions(MixerOptions):
    """Options of FNet."""

    norm: Literal["backward", "ortho"] = pydantic.Field(
        "backward", description="DFT scaling: 'backward' (the paper, unscaled) or 'ortho' (divide by sqrt(n d))"
    )


_SPECTRAL = dict(causal=False, bidirectional=True, padding_mask=True, decode=False, exact=False,
                 forms=("reference", "fast"))


@register_mixer("fnet")
class FNet(Mixer):
    """FNet: y = Re(FFT2(x)) over (seq, hidden), parameter-free, O(N d log(N d)); bidirectional only."""

    capabilities = Capabilities(
        family="spectral",
        paper="FNet: Mixing Tokens with Fourier Transforms",
        time="O(N d log(N d))",
        memory="O(N d)",
        **_SPECTRAL,
    )
    Options = FNetOptions

    def init_roles(self) -> dict[str, list[Tensor]]:
        """FNet has no weights."""
        return {"value": [], "output": []}

    def _scale(self, n: int) -> float:
        return 1.0 if self.opts.norm == "backward" else 1.0 / math.sqrt(n * self.d_model)

    def forward_reference(self, x, *, mask, state, pos):
        """Re(F_n X F_d^T) with explicit DFT matrices, in complex128."""
        u = _zero_pads(x, mask).to(torch.float64)
        n = x.shape[1]
        fn, fd = dft_matrix(n, x.device), dft_matrix(self.d_model, x.device)
        y = (fn @ u.to(fn.dtype) @ fd.T).real * self._scale(n)
        return y.to(x.dtype), state

    def forward_fast(self, x, *, mask, state, pos):
        """``torch.fft.fft2`` over the last two dims, real part."""
        u = _wide(_zero_pads(x, mask))
        y = torch.fft.fft2(u, dim=(1, 2)).real * self._scale(x.shape[1])
        return y.to(x.dtype), state


class GatingOptions(MixerOptions):
    """Options of the spectral gating (global filter) layer."""

    init_std: float = pydantic.Field(0.02, gt=0, description="std of the real and imaginary filter weights at init")


@register_mixer("spectral_gating")
class SpectralGating(Mixer):
    """SpectFormer/GFNet spectral gating: irfft(W * rfft(x)) per channel, a learned global filter; bidirectional."""

    capabilities = Capabilities(
        family="spectral",
        paper="SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
        time="O(L d log L), L = max_len",
        memory="O(L d)",
        **_SPECTRAL,
    )
    Options = GatingOptions
    test_max_len = 16  # a short filter: the reference materialises an (n x n) circulant

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        f = self.max_len // 2 + 1
        # GFNet's init: small complex weights, stored as a real view (frequencies, channels, 2).
        self.filter = nn.Parameter(torch.randn(f, d_model, 2) * self.opts.init_std)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """No value projection; the filter, the branch's only (and last) linear map, is the output weight."""
        return {"value": [], "output": [self.filter]}

    def _check_len(self, n: int) -> None:
        if n > self.max_len:
            raise ShapeError(f"spectral_gating: sequence of {n} tokens exceeds max_len={self.max_len}, the "
                             "filter's circular length; raise the model's max_len")

    def frequency_response(self) -> Tensor:
        """W (max_len // 2 + 1, d_model) complex, with the imaginary parts irfft cannot represent removed.

        A real length-L kernel has a real DC term (and a real Nyquist term when L is even); irfft drops
        those imaginary parts in its forward but not in its backward, so they are zeroed here.
        """
        w = torch.view_as_complex(_wide(self.filter).contiguous())
        real = [w[:1].real.to(w.dtype), w[1:]]
        if self.max_len % 2 == 0 and w.shape[0] > 1:
            real = [real[0], w[1:-1], w[-1:].real.to(w.dtype)]
        return torch.cat(real)

    def kernel(self) -> Tensor:
        """The filter's circular convolution kernel k (max_len, d_model) = irfft(W) in float32."""
        return torch.fft.irfft(self.frequency_response(), n=self.max_len, dim=0)

    def forward_reference(self, x, *, mask, state, pos):
        """y_i = sum_j k[(i - j) mod L] x_j with the circulant matrix written out (n x n per channel)."""
        n = x.shape[1]
        self._check_len(n)
        k = self.kernel()
        i = torch.arange(n, device=x.device)
        circ = k[(i[:, None] - i[None, :]) % self.max_len]  # (n, n, d)
        y = torch.einsum("ijc,bjc->bic", circ, _wide(_zero_pads(x, mask))).contiguous()
        return y.to(x.dtype), state

    def forward_fast(self, x, *, mask, state, pos):
        """rfft of the sequence zero-padded to max_len, times W, irfft, first n positions."""
        n = x.shape[1]
        self._check_len(n)
        u = _wide(_zero_pads(x, mask))
        w = self.frequency_response()
        y = torch.fft.irfft(torch.fft.rfft(u, n=self.max_len, dim=1) * w, n=self.max_len, dim=1)[:, :n].contiguous()
        return y.to(x.dtype), state
