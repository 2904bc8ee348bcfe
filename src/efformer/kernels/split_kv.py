"""Split-KV exact decode attention: a few queries against a long cache, split along the keys.

From "Flash-Decoding for long-context inference" (Dao et al., 2023) and "Lean Attention:
Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers" (Sanovar et al.,
2024): at decode time there is one query per sequence, so parallelism must come from the key axis.
The cache is cut into chunks; each chunk yields an unnormalised output, its row maximum and its
row sum of exponentials, and the chunks are merged exactly by log-sum-exp:

    m = max_c m_c,   o = sum_c e^{m_c - m} o_c / sum_c e^{m_c - m} l_c

The torch form runs every chunk as one batched matmul (the chunks are a tensor axis); the result
equals softmax attention to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.errors import ConfigError, ShapeError


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                       chunk_size: int = 1024) -> Tensor:
    """Exact attention of q (b, h, n, d) over k, v (b, kv, t, d), kv dividing h (grouped queries).

    ``attn_mask`` is a bool keep-mask or an additive float bias broadcastable to (b, h, n, t). Keys
    are split into ceil(t / chunk_size) chunks merged by log-sum-exp. Returns (b, h, n, d).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError("chunk_size", chunk_size, "a positive integer (keys per split)")
    b, h, n, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    if h % kv or k.shape != v.shape[:3] + (d,) or k.shape[0] != b:
        raise ShapeError(f"split_kv_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} "
                         "must share batch and head dim, with kv heads dividing query heads")
    g = h // kv
    bias = None
    if attn_mask is not None:
        bias = attn_mask.expand(b, h, n, t)
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    pad = (-t) % chunk_size
    c = (t + pad) // chunk_size
    # (b, kv, c, L, d): chunks as a batch axis; padded keys get -inf so they carry no weight.
    kc = F.pad(k, (0, 0, 0, pad)).unflatten(2, (c, chunk_size))
    vc = F.pad(v, (0, 0, 0, pad)).unflatten(2, (c, chunk_size))
    qg = q.reshape(b, kv, g * n, d)[:, :, None]  # (b, kv, 1, g n, d)
    s = (qg @ kc.transpose(-1, -2)) / math.sqrt(d)  # (b, kv, c, g n, L)
    if bias is not None or pad:
        full = torch.zeros(b, h, n, t, dtype=s.dtype, device=q.device) if bias is None else bias.to(s.dtype)
        full = F.pad(full, (0, pad), value=float("-inf")).reshape(b, kv, g * n, c, chunk_size)
        s = s + full.permute(0, 1, 3, 2, 4)
    m = s.amax(-1, keepdim=True)  # (b, kv, c, g n, 1)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)  # a chunk with no allowed key contributes nothing
    p = torch.exp(s - m_safe)
    o_c, l_c = p @ vc, p.sum(-1, keepdim=True)  # unnormalised per-chunk output and row sum
    top = m.amax(2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w = torch.exp(m_safe - top) * torch.isfinite(m)  # each chunk's rescale to the common maximum
    o = (o_c * w).sum(2) / (l_c * w).sum(2)
    return o.reshape(b, h, n, d)
