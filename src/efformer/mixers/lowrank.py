"""Low-rank attention: softmax attention against a short summary of the keys and values.

Papers: "Linformer: Self-Attention with Linear Complexity" (keys and values projected along the
sequence to k rows by learned E, F) and "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention" (the softmax matrix rebuilt from m landmark rows and columns: segment means of q and
k, with an iterative Moore-Penrose pseudo-inverse). Both are bidirectional only: a projection or a
landmark mixes every position, so neither can hide the future.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.base import Capabilities, Mixer, MixerOptions
from efformer.registry import register_mixer


class LinformerOptions(MixerOptions):
    """Options of Linformer."""

    k: int = pydantic.Field(256, gt=0, description="projected length of keys and values")
    # "none": E, F per head; "headwise": one E and one F shared by the heads; "kv": one E = F shared by all.
    sharing: Literal["none", "headwise", "kv"] = pydantic.Field(
        "headwise", description="E/F sharing: none (per head, E != F), headwise (one E, F for all heads), kv (E = F)"
    )


class NystromOptions(MixerOptions):
    """Options of Nyströmformer."""

    landmarks: int = pydantic.Field(64, gt=0, description="m landmarks (segment means of q and of k)")
    pinv_iters: int = pydantic.Field(6, ge=1, description="iterations of the Moore-Penrose pseudo-inverse")
    conv_kernel: int = pydantic.Field(
        0, ge=0,
        description="depthwise conv skip on values along the sequence; 0 = off, else odd",
    )


class _Projections(Mixer):
    """q/kv/out projections named as in SoftmaxAttention (no bias), so weights can be copied across."""

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Value rows of the fused k|v projection, and the output projection."""
        return {"value": [self.kv_proj.weight[self.d_model :]], "output": [self.out_proj.weight]}

    def _qkv(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (b, h, n, head_dim), with k and v zeroed at padded positions."""
        q = self.split_heads(self.q_proj(x))
        k, v = self.split_heads(self.kv_proj(x), 2 * self.n_heads).chunk(2, dim=1)
        if mask is not None:
            keep = mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        return q, k, v

    def _finish(self, o: Tensor) -> Tensor:
        return self.out_proj(self.merge_heads(o))


@register_mixer("linformer")
class Linformer(_Projections):
    """Linformer: softmax(Q (E K)^T / sqrt(d)) (F V) with E, F (k, max_len) learned; O(N k) time and memory."""

    capabilities = Capabilities(
        family="low-rank",
        paper="Linformer: Self-Attention with Linear Complexity",
        causal=False,
        bidirectional=True,
        padding_mask=True,
        decode=False,
        exact=False,
        time="O(N k d)",
        memory="O(N k)",
        forms=("reference", "fast"),
    )
    Options = LinformerOptions
    test_options = {"k": 5, "sharing": "none"}
    test_max_len = 16

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        heads = n_heads if o.sharing == "none" else 1
        # std 1/sqrt(max_len): at full length a projected key has the scale of a single key.
        self.e_proj = nn.Parameter(torch.randn(heads, o.k, self.max_len) / math.sqrt(self.max_len))
        if o.sharing != "kv":
            self.f_proj = nn.Parameter(torch.randn(heads, o.k, self.max_len) / math.sqrt(self.max_len))

    def _project(self, x, mask):
        """q (b, h, n, d) and the projected keys/values (b, h, k, d); padded keys are zeroed first."""
        n, max_len = x.shape[1], self.max_len
        if n > max_len:
            raise ShapeError(
                f"linformer: sequence length {n} exceeds max_len={max_len} (E and F have max_len columns); "
                "raise the model's max_len or shorten the input"
            )
        q, k, v = self._qkv(x, mask)
        e = self.e_proj[..., :n]  # a shorter sequence uses the first n columns
        f = e if self.opts.sharing == "kv" else self.f_proj[..., :n]
        return q, e @ k, f @ v

    def forward_reference(self, x, *, mask, state, pos):
        """Explicit projected attention: scores (b, h, n, k), softmax, dropout, times F V."""
        q, kp, vp = self._project(x, mask)
        p = ((q @ kp.transpose(-1, -2)) / math.sqrt(self.head_dim)).softmax(-1)
        p = F.dropout(p, self.dropout, self.training)
        return self._finish(p @ vp), state

    def forward_fast(self, x, *, mask, state, pos):
        """The projected attention by ``scaled_dot_product_attention`` (fused kernel)."""
        q, kp, vp = self._project(x, mask)
        o = F.scaled_dot_product_attention(q, kp, vp, dropout_p=self.dropout if self.training else 0.0)
        return self._finish(o), state


def iterative_pinv(a: Tensor, iters: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) by the cubic iteration used in Nyströmformer.

    Z_0 = A^T / (||A||_1 ||A||_inf);  Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4.
    """
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm = a.abs().sum(-1).amax(-1) * a.abs().sum(-2).amax(-1)  # per matrix, so rows never mix
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register_mixer("nystromformer")
class Nystromformer(_Projections):
    """Nyströmformer: softmax(Q L_k^T) pinv(softmax(L_q L_k^T)) softmax(L_q K^T) V with m landmarks; O(N m)."""

    capabilities = Capabilities(
        family="low-rank",
        paper="Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
        causal=False,
        bidirectional=True,
        padding_mask=True,
        decode=False,
        exact=False,
        time="O(N m d + m^3)",
        memory="O(N m)",
        forms=("reference", "fast"),
    )
    Options = NystromOptions
    test_options = {"landmarks": 4, "conv_kernel": 3}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        ck = self.opts.conv_kernel
        if ck and ck % 2 == 0:
            raise ConfigError("nystromformer.conv_kernel", ck, "0 (off) or an odd kernel size such as 33")
        if ck:
            # Depthwise over the sequence, one filter per head, as in the paper's skip connection.
            self.conv = nn.Conv2d(n_heads, n_heads, (ck, 1), padding=(ck // 2, 0), groups=n_heads, bias=False)

    def _landmarks(self, q: Tensor, k: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Segment means L_q, L_k (b, h, m, d) over real tokens, and which landmarks are non-empty (b|1, m).

        Position j belongs to segment floor(j m / n): segment sizes differ by at most one when m does
        not divide n; a segment with no real token (n < m, or all padded) is an empty landmark.
        """
        n, m = q.shape[2], self.opts.landmarks
        seg = torch.arange(n, device=q.device) * m // n
        assign = (seg[None, :] == torch.arange(m, device=q.device)[:, None]).to(q.dtype)[None]  # (1, m, n)
        if mask is not None:
            assign = assign * mask[:, None, :].to(q.dtype)
        counts = assign.sum(-1)
        w = (assign / counts.clamp_min(1)[..., None])[:, None]  # (b|1, 1, m, n)
        return w @ q, w @ k, counts > 0

    def _kernel2_pinv(self, lq: Tensor, lk: Tensor, valid: Tensor) -> Tensor:
        """pinv(softmax(L_q L_k^T / sqrt(d))) (b, h, m, m); empty landmarks get identity rows/columns.

        The identity block keeps the matrix block-diagonal, so the pseudo-inverse of the real block
        is unchanged and the empty landmarks (zero columns of kernel 1) contribute exactly nothing.
        """
        m = lq.shape[2]
        s = (lq @ lk.transpose(-1, -2)) / math.sqrt(self.head_dim)
        a = s.masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1)
        eye = torch.eye(m, device=a.device, dtype=a.dtype)
        a = torch.where(valid[:, None, :, None], a, eye)
        return iterative_pinv(a, self.opts.pinv_iters)

    def _skip(self, v: Tensor) -> Tensor | float:
        """The depthwise conv of the (pad-zeroed) values, or 0 when off."""
        return self.conv(v) if self.opts.conv_kernel else 0.0

    def forward_reference(self, x, *, mask, state, pos):
        """The three kernel matrices written out: (b,h,n,m), (b,h,m,m) pseudo-inverted, (b,h,m,n)."""
        q, k, v = self._qkv(x, mask)
        lq, lk, valid = self._landmarks(q, k, mask)
        scale = 1 / math.sqrt(self.head_dim)
        k1 = ((q @ lk.transpose(-1, -2)) * scale).masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1)
        s3 = (lq @ k.transpose(-1, -2)) * scale
        if mask is not None:
            s3 = s3.masked_fill(~mask[:, None, None, :], -math.inf)
        k3 = s3.softmax(-1)
        o = (k1 @ self._kernel2_pinv(lq, lk, valid)) @ (k3 @ v)
        return self._finish(o + self._skip(v)), state

    def forward_fast(self, x, *, mask, state, pos):
        """Kernels 1 and 3 by ``scaled_dot_product_attention``: L_q attends to K, then Q attends to L_k."""
        q, k, v = self._qkv(x, mask)
        lq, lk, valid = self._landmarks(q, k, mask)
        key_keep = mask[:, None, None, :] if mask is not None else None
        w = self._kernel2_pinv(lq, lk, valid) @ F.scaled_dot_product_attention(lq, k, v, attn_mask=key_keep)
        o = F.scaled_dot_product_attention(q, lk, w, attn_mask=valid[:, None, None, :])
        return self._finish(o + self._skip(v)), state
