"""Split-KV exact decode attention: a few queries against a long cache, split along the keys.

From "Flash-Decoding for long-context inference" (Dao et al., 2023) and "Lean Attention:
Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers" (Sanovar et al.,
2024): at decode time there is one query per sequence, so parallelism must come from the key axis.
The cache is cut into chunks; each chunk yields an unnormalised output, its row maximum and its
row sum of exponentials, and the chunks are merged exactly by log-sum-exp:

    m = max_c m_c,   o = sum_c e^{m_c - m} o_c / sum_c e^{m_c - m} l_c

The torch form runs every chunk as one batched matmul (the chunks are a tensor axis); the result
equals softmax attention to rounding. The Triton form (forward only: decoding) runs one program per
(batch, kv head, chunk): it loads the chunk's keys once for the queries of every query head that
shares them (grouped-query attention), keeps an online softmax over key tiles, and writes the
chunk's (o_c, m_c, l_c); a second program per (batch, kv head) merges the chunks by log-sum-exp.
``backend="auto"`` picks Triton on CUDA tensors only (on CPU, TRITON_INTERPRET=1 runs it for tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.kernels.chunk_gla import triton_runs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None

TRITON_MAX_ROWS = 128  # query rows (query heads per kv head x new tokens) one program holds


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                       chunk_size: int = 1024, backend: str = "auto") -> Tensor:
    """Exact attention of q (b, h, n, d) over k, v (b, kv, t, d), kv dividing h (grouped queries).

    ``attn_mask`` is a bool keep-mask or an additive float bias broadcastable to (b, h, n, t). Keys
    are split into ceil(t / chunk_size) chunks merged by log-sum-exp. Returns (b, h, n, d).
    ``backend``: "torch", "triton" (forward only) or "auto" (Triton for CUDA tensors, else torch).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ConfigError("backend", backend, "one of 'auto', 'torch', 'triton'")
    if backend == "triton" or (backend == "auto" and q.is_cuda and triton_runs(q.device)
                               and not _needs_grad(q, k, v) and _rows(q, k) <= TRITON_MAX_ROWS):
        return split_kv_triton(q, k, v, attn_mask, chunk_size=chunk_size)
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


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _rows(q: Tensor, k: Tensor) -> int:
    """Query rows sharing one kv head: query heads per kv head times new tokens."""
    return q.shape[1] // max(k.shape[1], 1) * q.shape[2]


def split_kv_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                    chunk_size: int = 1024) -> Tensor:
    """:func:`split_kv_attention` by the Triton kernels (forward only); same arguments, same result."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError("chunk_size", chunk_size, "a positive integer (keys per split)")
    if not triton_runs(q.device):
        raise CapabilityError("split_kv: the Triton kernel needs triton and CUDA tensors (or TRITON_INTERPRET=1 "
                              "set before importing efformer); use backend='torch' or 'auto'")
    if _needs_grad(q, k, v):
        raise CapabilityError("split_kv: the Triton kernel is forward only (decoding); run under torch.no_grad() "
                              "or use backend='torch'")
    b, h, n, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    if h % kv or k.shape != v.shape[:3] + (d,) or k.shape[0] != b:
        raise ShapeError(f"split_kv_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} "
                         "must share batch and head dim, with kv heads dividing query heads")
    rows = _rows(q, k)
    if rows > TRITON_MAX_ROWS:
        raise ShapeError(f"split_kv: the Triton kernel holds {TRITON_MAX_ROWS} query rows per kv head, got {rows} "
                         "(query heads per kv head x new tokens); use backend='torch'")
    bias = None
    if attn_mask is not None:
        bias = attn_mask.expand(b, h, n, t)
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device).masked_fill(~bias, float("-inf"))
        bias = bias.float().contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    c = -(-t // chunk_size)
    o_part = torch.empty(b * kv, c, rows, d, device=q.device, dtype=torch.float32)
    m_part = torch.empty(b * kv, c, rows, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    out = torch.empty_like(q)
    meta = dict(D=d, BD=max(16, triton.next_power_of_2(d)), BM=max(16, triton.next_power_of_2(rows)),
                BN=min(64, max(16, triton.next_power_of_2(chunk_size))), HAS_BIAS=bias is not None)
    _split_kv_chunks[(b * kv, c)](q, k, v, bias if bias is not None else q, o_part, m_part, l_part,
                                  t, chunk_size, rows, 1.0 / math.sqrt(d), **meta)
    _split_kv_merge[(b * kv,)](o_part, m_part, l_part, out, c, rows, D=meta["D"], BD=meta["BD"], BM=meta["BM"])
    return out


if triton is not None:

    @triton.jit
    def _split_kv_chunks(q, k, v, bias, o_part, m_part, l_part, T, CHUNK, ROWS, scale,
                         D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         HAS_BIAS: tl.constexpr):
        """One (batch x kv head, chunk): the ROWS queries of that kv head's query heads against the
        chunk's keys, with an online softmax over BN-key tiles -> o_c (ROWS, D), m_c, l_c (ROWS,)."""
        g = tl.program_id(0).to(tl.int64)  # batch * kv heads + kv head: its queries are ROWS contiguous rows
        c = tl.program_id(1).to(tl.int64)
        nc = tl.num_programs(1)
        r, dd = tl.arange(0, BM), tl.arange(0, BD)
        rm, dm = r < ROWS, dd < D
        qq = tl.load(q + (g * ROWS + r[:, None]) * D + dd[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
        qq = qq.to(tl.float32) * scale
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        start = c * CHUNK
        for j0 in range(0, CHUNK, BN):
            j = start + j0 + tl.arange(0, BN)
            jm = (j < T) & (j0 + tl.arange(0, BN) < CHUNK)
            kv_mask = jm[:, None] & dm[None, :]
            kk = tl.load(k + (g * T + j[:, None]) * D + dd[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            vv = tl.load(v + (g * T + j[:, None]) * D + dd[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(qq, tl.trans(kk), input_precision="ieee")  # (BM, BN)
            if HAS_BIAS:
                s += tl.load(bias + (g * ROWS + r[:, None]) * T + j[None, :], mask=rm[:, None] & jm[None, :],
                             other=float("-inf"))
            s = tl.where(jm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: weights stay 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            acc = acc * alpha[:, None] + tl.dot(p, vv, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        part = g * nc + c
        tl.store(o_part + (part * ROWS + r[:, None]) * D + dd[None, :], acc, mask=rm[:, None] & dm[None, :])
        tl.store(m_part + part * ROWS + r, m_i, mask=rm)
        tl.store(l_part + part * ROWS + r, l_i, mask=rm)

    @triton.jit
    def _split_kv_merge(o_part, m_part, l_part, out, NC, ROWS, D: tl.constexpr, BD: tl.constexpr,
                        BM: tl.constexpr):
        """One (batch x kv head): merge its NC chunks by log-sum-exp -> out (ROWS, D)."""
        g = tl.program_id(0).to(tl.int64)
        r, dd = tl.arange(0, BM), tl.arange(0, BD)
        rm, dm = r < ROWS, dd < D
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for c in range(NC):
            part = g * NC + c
            m_c = tl.load(m_part + part * ROWS + r, mask=rm, other=float("-inf"))
            l_c = tl.load(l_part + part * ROWS + r, mask=rm, other=0.0)
            o_c = tl.load(o_part + (part * ROWS + r[:, None]) * D + dd[None, :], mask=rm[:, None] & dm[None, :],
                          other=0.0)
            m_new = tl.maximum(m_i, m_c)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a, w = tl.exp(m_i - m_safe), tl.exp(m_c - m_safe)
            acc = acc * a[:, None] + o_c * w[:, None]
            l_i = l_i * a + l_c * w
            m_i = m_new
        o = acc / tl.where(rm, l_i, 1.0)[:, None]  # rows past ROWS are padding (never stored)
        tl.store(out + (g * ROWS + r[:, None]) * D + dd[None, :], o.to(out.dtype.element_ty),
                 mask=rm[:, None] & dm[None, :])
