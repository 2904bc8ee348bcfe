"""Bidirectional selective state-space mixer: Vision Mamba (Vim).

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space
Model" (Zhu et al., 2024).

One input projection gives the stream u and the gate z; u runs through two S6 branches, one over
the tokens in order and one over them reversed (each with its own causal convolution, dt/B/C
projections, A and D), and their sum, gated by silu(z), is projected out. The scans are Mamba's
(``mixers/mamba.py``): "reference" is the sequential recurrence, "chunked" the chunk-parallel one.
Vim flattens the patch grid row-major, so it needs no grid and also mixes 1-D sequences. Padding: a
padded step feeds zeros to the convolutions and has dt = 0, and a right-padded row reversed is a
left-padded one, so padding never reaches real outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities, Mixer
from efformer.mixers.mamba import Mamba, s6_scan_chunked, s6_scan_reference
from efformer.nn.recurrent import ShortConv, inverse_softplus_dt
from efformer.registry import register_mixer


class _Direction(nn.Module):
    """One scan direction's own parts: convolution, dt/B/C projections, A (S4D-real init) and D."""

    def __init__(self, d_inner: int, dt_rank: int, opts):
        super().__init__()
        n = opts.d_state
        self.conv1d = ShortConv(d_inner, opts.d_conv)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(d_inner, opts.dt_min, opts.dt_max))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.dt_rank, self.d_state = dt_rank, n

    def forward(self, u: Tensor, keep: Tensor | None, scan) -> Tensor:
        """u (b, l, d_inner) in scan order -> (b, l, d_inner), with ``scan`` one of Mamba's S6 scans."""
        if keep is not None:
            u = u * keep
        v = F.silu(self.conv1d(u)[0])
        dt, B, C = self.x_proj(v).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        if keep is not None:
            delta = delta * keep
        h0 = v.new_zeros(v.shape[0], v.shape[-1], self.d_state)
        return scan(v, delta, -torch.exp(self.A_log), B, C, h0)[0] + v * self.D


@register_mixer("vim")
class VisionMamba(Mixer):
    """Vision Mamba: (b, n, d) -> (b, n, d) through a forward and a backward selective scan."""

    capabilities = Capabilities(
        family="ssm", paper="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State "
                            "Space Model",
        causal=False, bidirectional=True, padding_mask=True, decode=False, exact=False,
        time="O(N d_inner d_state), two scans", memory="O(N c d_inner d_state) chunked",
        forms=("reference", "chunked"),
    )
    Options = Mamba.Options
    test_options = {"d_state": 4, "chunk_size": 4, "dt_rank": 2}
    reference_below = Mamba.reference_below  # the sequential scan is faster for short inputs on CPU

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        o = self.opts
        if o.dt_min > o.dt_max:
            raise ConfigError(f"{self.name}.dt_min", o.dt_min, f"must not exceed dt_max={o.dt_max}")
        self.d_inner = o.expand * self.d_model
        dt_rank = o.dt_rank or math.ceil(self.d_model / 16)
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=False)
        self.forward_scan, self.backward_scan = _Direction(self.d_inner, dt_rank, o), _Direction(self.d_inner,
                                                                                                 dt_rank, o)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """The u rows of the input projection, and the output projection (as Mamba)."""
        return {"value": [self.in_proj.weight[: self.d_inner]], "output": [self.out_proj.weight]}

    def _mix(self, x: Tensor, mask: Tensor | None, scan) -> Tensor:
        keep = None if mask is None else mask[..., None].to(x.dtype)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.forward_scan(u, keep, scan)
        back = self.backward_scan(u.flip(1), None if keep is None else keep.flip(1), scan).flip(1)
        return self.out_proj((y + back) * F.silu(z))

    def forward_reference(self, x, *, mask, state, pos):
        """Both directions by the sequential recurrence."""
        return self._mix(x, mask, s6_scan_reference), None

    def forward_chunked(self, x, *, mask, state, pos):
        """Both directions by Mamba's chunk-parallel scan."""
        return self._mix(x, mask, lambda *a: s6_scan_chunked(*a, self.opts.chunk_size)), None
