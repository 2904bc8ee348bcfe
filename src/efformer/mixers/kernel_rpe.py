"""Kernelized attention with relative positional encoding, computed by FFT over the Toeplitz RPE matrix.

Paper: "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding" (Luo, Li,
Cai, He, Zheng, Ke, Wang & Liu, NeurIPS 2021).

Softmax attention with a relative bias ``b_{j-i}`` weighs key j for query i by
``exp(q_i.k_j / sqrt(d)) exp(b_{j-i})``. With Performer's positive random features
``exp(q.k / sqrt(d)) ~ phi(q).phi(k)`` this is ``C_ij phi(q_i).phi(k_j)`` where ``C_ij = exp(b_{j-i})``
is a Toeplitz matrix, so

    z_i = phi(q_i)^T sum_j C_ij phi(k_j) v_j^T / phi(q_i)^T sum_j C_ij phi(k_j),

and each ``sum_j C_ij u_j`` over a sequence of vectors ``u_j`` is a Toeplitz matrix-vector product,
i.e. a convolution, done by FFT in O(N log N) per feature-value pair: O(N m d log N) in all.
Causal attention keeps the lower triangle of C, which is still Toeplitz; the paper's encoder is the
bidirectional case. The bias has one learned value per head and offset (2 max_len - 1 offsets, or
max_len distances when causal), initialised at zero, where the layer is exactly Performer.

Forms: "reference" builds the (n x t) Toeplitz C and the explicit kernel matrix; "fast" convolves by
FFT (in float32; ``torch.fft`` has no bfloat16 on CPU). Decoding caches keys and values (the bias
depends on the distance, so no fixed-size running sum exists) and costs O(t m d) per token. Offsets
count token slots (padding included), which is what makes C Toeplitz.
"""

from __future__ import annotations

import math

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.mixers.base import Capabilities, MixerOptions
from efformer.mixers.kernel import Performer
from efformer.mixers.softmax import KVState, needs_graph
from efformer.registry import register_mixer


class KernelRPEOptions(MixerOptions):
    """Options of kernelized attention with RPE."""

    n_features: int = pydantic.Field(256, gt=0, description="random features m per head (paper: as Performer)")
    redraw_every: int = pydantic.Field(
        0, ge=0, description="in training, redraw the features every this many calls; 0 = never",
    )


def toeplitz_product(u: Tensor, coef: Tensor, causal: bool, n_q: int) -> Tensor:
    """sum_j C_ij u_j for the last ``n_q`` of t query slots, by FFT.

    u (b, h, t, ...) real; coef (h, L): per head, the weight of distance i - j (causal, L >= t) or of
    offset j - i stored at index (j - i) + (L + 1) / 2 - 1 (bidirectional, L = 2 max_len - 1).
    Returns (b, h, n_q, ...) in float32 (or float64 when u is).
    """
    t = u.shape[2]
    size = 1 << (2 * t - 1).bit_length()  # >= 2t - 1, so the circular convolution never wraps
    g = coef.new_zeros(coef.shape[0], size)
    if causal:
        g[:, :t] = coef[:, :t]  # r[k] at k = i - j >= 0
    else:
        mid = (coef.shape[1] - 1) // 2  # offset 0; r[k] for k = i - j is coef[mid - k]
        g[:, :t] = coef[:, mid - t + 1 : mid + 1].flip(-1)
        g[:, size - t + 1 :] = coef[:, mid + 1 : mid + t].flip(-1)
    fg = torch.fft.rfft(g, dim=-1)
    fg = fg.reshape(1, *fg.shape, *([1] * (u.dim() - 3)))
    y = torch.fft.irfft(torch.fft.rfft(u, n=size, dim=2) * fg, n=size, dim=2)
    return y[:, :, t - n_q : t]


@register_mixer("kernel_rpe")
class KernelRPE(Performer):
    """FAVOR+ random-feature attention times a learned Toeplitz RPE exp(b_{j-i}), by FFT: O(N m d log N)."""

    capabilities = Capabilities(
        family="kernel",
        paper="Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N m d log N)",
        memory="O(N m d) fast (the FFT of every feature-value pair), O(t d) decode cache",
        forms=("reference", "fast"),
    )
    Options = KernelRPEOptions
    test_options = {"n_features": 16}
    test_max_len = 32
    # Measured on a busy 2-core CPU (d_model 64, 4 heads, m = 256, batch 4, bidirectional): the explicit form
    # took 65 / 159 / 1849 ms at N = 64 / 256 / 1024, the FFT form 1442 / 5043 / 22682 ms: its m (d + 1)
    # length-2N transforms are memory-bound, so on CPU "auto" keeps the explicit form up to this length.
    reference_below = 2048

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        span = self.max_len if self.causal else 2 * self.max_len - 1
        self.rpe = nn.Parameter(torch.zeros(n_heads, span))  # b: zero makes the layer exactly Performer

    def init_state(self, batch, device, dtype) -> KVState:
        """An empty cache of keys and values (batch, heads, t, head_dim)."""
        return KVState.empty(batch, self.n_heads, self.head_dim, device, dtype)

    def _project(self, x: Tensor, mask, state, pos):
        """phi(q) (b, h, n, m), phi(k) (b, h, t, m) and v (b, h, t, d) with the cache, exp(b) (h, span)."""
        h = self.n_heads
        q = self.split_heads(self.q_proj(x))
        k, v = self.split_heads(self.kv_proj(x), 2 * h).chunk(2, dim=1)
        if mask is not None:
            v = v * mask[:, None, :, None].to(v.dtype)
        keep = mask
        if state is not None:
            state.append(k, v, pos.positions, mask, graph=needs_graph(q, k, v))
            k, v = state.k, state.v
            keep = state.keep if mask is not None or state.padded else None
        if k.shape[2] > self.max_len:
            raise ShapeError(f"kernel_rpe: {k.shape[2]} tokens exceed max_len={self.max_len}, the span of the "
                             "learned relative offsets; raise the model's max_len")
        aq, ak = self._log_features(q), self._log_features(k)
        # Stabilisers (per query; one per (batch, head) for keys; one per head for exp(b)) cancel in the ratio.
        fq = torch.exp(aq - aq.detach().amax(-1, keepdim=True))
        if keep is not None:
            ak = ak.masked_fill(~keep[:, None, :, None], -math.inf)
        c = ak.detach().amax(dim=(2, 3), keepdim=True)
        fk = torch.exp(ak - torch.where(torch.isfinite(c), c, torch.zeros_like(c)))
        b = self.rpe.to(fq.dtype)
        return fq, fk, v, torch.exp(b - b.detach().amax(-1, keepdim=True))

    def toeplitz(self, coef: Tensor, n_q: int, t: int) -> Tensor:
        """The explicit (h, n_q, t) matrix C_ij = exp(b_{j-i}) for the last n_q of t query slots (0 above
        the diagonal when causal)."""
        i = torch.arange(t - n_q, t, device=coef.device)[:, None]
        j = torch.arange(t, device=coef.device)[None, :]
        if self.causal:
            return torch.where(j <= i, coef[:, (i - j).clamp_min(0)], 0.0)
        return coef[:, j - i + self.max_len - 1]

    def _out(self, num: Tensor, den: Tensor, state):
        o = num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
        return self.out_proj(self.merge_heads(o)), state

    def forward_reference(self, x, *, mask, state, pos):
        """A = (phi(Q) phi(K)^T) * C with C the explicit Toeplitz matrix; z = A V / rowsum(A)."""
        fq, fk, v, coef = self._project(x, mask, state, pos)
        a = (fq @ fk.transpose(-1, -2)) * self.toeplitz(coef, fq.shape[2], fk.shape[2])
        return self._out(a @ v, a.sum(-1), state)

    def forward_fast(self, x, *, mask, state, pos):
        """sum_j C_ij phi(k_j) [v_j, 1]^T by FFT for every feature, then contracted with phi(q_i)."""
        fq, fk, v, coef = self._project(x, mask, state, pos)
        wide = torch.float64 if v.dtype == torch.float64 else torch.float32
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # the last column gives the normaliser
        u = (fk[..., :, None] * v1[..., None, :]).to(wide)  # (b, h, t, m, d + 1)
        s = toeplitz_product(u, coef.to(wide), self.causal, fq.shape[2])
        y = torch.einsum("bhnm,bhnme->bhne", fq.to(wide), s).to(v.dtype)
        return self._out(y[..., :-1], y[..., -1], state)
