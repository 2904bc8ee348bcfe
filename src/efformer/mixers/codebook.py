"""LongVQ: attention over keys vector-quantized to a learned codebook (a fixed-size structured memory).

Paper: "LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory" (Liu et al.,
2024); the quantized-key attention it builds on is that of "Transformer-VQ: Linear-Time
Transformers via Vector Quantization" (Lingle, 2023).

Each key k_j is replaced by its nearest code, k^_j = c_{z_j}, z_j = argmin_s |k_j - c_s|, from a
codebook of S codes per key head. Attention is then ordinary softmax attention over the quantized
keys, but since only S distinct keys exist it factorises over codes:

    sum_j exp(q_i . k^_j) v_j = sum_s exp(q_i . c_s) U_s,   U_s = sum_{j: z_j = s} v_j,

so the whole past is an S-row memory (U, counts) and the cost is O(N S d) instead of O(N^2 d);
causal attention keeps U as running sums (the decode state) and is exact within each chunk.

Training is straight-through: k^_j = c_{z_j} + (k_j - sg(k_j)), so the task loss reaches the codebook
(through c_{z_j}) and the keys (as if unquantized). In the factorised form the key gradient comes from
first-order terms that are zero in value: exp(q.(c_s + delta_j)) = exp(q.c_s) (1 + q.delta_j) for
delta_j = k_j - sg(k_j) = 0, i.e. the per-code sums W_s = sum delta_j v_j^T and D_s = sum delta_j,
built only when autograd records the call. Attention dropout does not apply (the factorised form
has no probabilities to drop). The paper's SSM-style local mixing is a separate mixer
(compose with ``s4d``); this module is its vector-quantized global memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from efformer.errors import ShapeError
from efformer.mixers.base import Capabilities, MixerState, causal_keep, pad_to_multiple
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions, attention_keep, needs_graph
from efformer.registry import register_mixer


@dataclass
class CodebookState(MixerState):
    """The memory of the past: per-code value sums u (batch, kv_heads, S, head_dim) and counts (batch, kv_heads, S)."""

    u: Tensor
    count: Tensor


class LongVQOptions(SoftmaxOptions):
    """Options of vector-quantized attention."""

    codebook_size: int = pydantic.Field(64, ge=1, description="S: codes per key head (the memory has S rows)")
    chunk: int = pydantic.Field(64, ge=1, description="block length of the causal chunked form")


@register_mixer("longvq")
class LongVQAttention(SoftmaxAttention):
    """Softmax attention over codebook-quantized keys, factorised over codes: O(N S d), straight-through training."""

    capabilities = Capabilities(
        family="hashing",
        paper="LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,
        time="O(N S d + N chunk d)",
        memory="O(N S + N S d^2 / chunk) chunked in training, O(S d) decode state",
        forms=("reference", "chunked"),
        rotary=True,
    )
    Options = LongVQOptions
    test_options = {"codebook_size": 5, "chunk": 4, "n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        # Scaled like the keys of a fresh layer (entries of variance ~1/3), so every code is reachable.
        self.codebook = nn.Parameter(0.5 * torch.randn(self.n_kv_heads, self.opts.codebook_size, self.head_dim))

    def init_state(self, batch, device, dtype) -> CodebookState:
        """An empty memory (no key seen)."""
        kv, s, d = self.n_kv_heads, self.opts.codebook_size, self.head_dim
        return CodebookState(u=torch.zeros(batch, kv, s, d, device=device, dtype=dtype),
                             count=torch.zeros(batch, kv, s, device=device, dtype=dtype))

    @torch.no_grad()
    def assign(self, k: Tensor) -> Tensor:
        """Nearest code ids (batch, kv_heads, seq) of keys k (batch, kv_heads, seq, head_dim)."""
        c = self.codebook.to(k.dtype)
        dist = c.square().sum(-1)[:, None] - 2 * torch.einsum("bhnd,hsd->bhns", k, c)  # |k|^2 is the same for all s
        return dist.argmin(-1)

    def _quantize(self, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Code ids, quantized keys c_z (batch, kv, seq, d) and delta = k - sg(k) (zero; carries the ST gradient)."""
        z = self.assign(k)
        cz = self.codebook.to(k.dtype)[torch.arange(self.n_kv_heads, device=k.device)[:, None], z]
        return z, cz, k - k.detach()

    def _groups(self, t: Tensor) -> Tensor:
        """Repeat kv-head tensors (batch, kv, ...) for the query heads sharing them."""
        g = self.n_heads // self.n_kv_heads
        return t.repeat_interleave(g, dim=1) if g > 1 else t

    # ---- forms ----------------------------------------------------------------------------
    def forward_reference(self, x, *, mask, state, pos):
        """Plain softmax attention over the straight-through quantized keys; a carried memory joins as
        S extra keys c_s with values U_s / count_s and log count_s added to their scores."""
        q, k, v_kv = self._qkv(x, pos)
        z, cz, delta = self._quantize(k)
        n = x.shape[1]
        kq, v = self._groups(cz + delta), self._groups(v_kv)
        scores = q @ kq.transpose(-1, -2) / math.sqrt(self.head_dim)
        allowed = attention_keep(mask, mask, n, n, self.causal, x.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        if state is None:
            return self._finish(scores.softmax(-1) @ v), state
        u, cnt = self._groups(state.u), self._groups(state.count)
        mem = q @ self._groups(self.codebook.to(q.dtype)[None]).transpose(-1, -2) / math.sqrt(self.head_dim)
        mem = mem + cnt.log()[:, :, None]  # -inf for empty codes
        p = torch.cat([mem, scores], -1).softmax(-1)
        o = p[..., : mem.shape[-1]] @ (u / cnt.clamp_min(1)[..., None]) + p[..., mem.shape[-1] :] @ v
        self._remember(state, self._onehot(z, mask, v_kv.dtype), v_kv, mask)
        return self._finish(o), state

    def forward_chunked(self, x, *, mask, state, pos):
        """Factorised over codes: bidirectional in one pass, causal by chunks with per-code prefix sums."""
        q, k, v = self._qkv(x, pos)
        z, cz, delta = self._quantize(k)
        b, h, n, d = q.shape
        keep = None if mask is None else mask[:, None, :, None].to(v.dtype)
        if keep is not None:
            v = v * keep  # a padded key adds nothing to any sum (huge pad values cannot make inf * 0)
            delta = delta * keep
        onehot = self._onehot(z, mask, v.dtype)  # (b, kv, n, S)
        grad = needs_graph(k)
        c = self._groups(self.codebook.to(q.dtype)[None])  # (1, h, S, d)
        e = q @ c.transpose(-1, -2) / math.sqrt(d)  # (b, h, n, S)
        # Every quantized score is some code's score, so the row max over codes bounds them all.
        top = e.detach().amax(-1, keepdim=True)
        e = torch.exp(e - top)
        u0 = None if state is None else self._groups(state.u)
        c0 = None if state is None else self._groups(state.count)
        v_h, oh, dl = self._groups(v), self._groups(onehot), self._groups(delta)
        if self.causal:
            num, den = self._causal_sums(q, self._groups(cz + delta), v_h, oh, dl, e, top, u0, c0, grad)
        else:
            u, cnt = oh.transpose(-1, -2) @ v_h, oh.sum(2)
            if u0 is not None:
                u, cnt = u + u0, cnt + c0
            num, den = e @ u, (e * cnt[:, :, None]).sum(-1)
            if grad:
                w = torch.einsum("bhns,bhnd,bhne->bhsde", oh, dl, v_h)
                num = num + torch.einsum("bhns,bhnd,bhsde->bhne", e, q, w) / math.sqrt(d)
                den = den + torch.einsum("bhns,bhnd,bhsd->bhn", e, q, oh.transpose(-1, -2) @ dl) / math.sqrt(d)
        o = num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
        if state is not None:
            self._remember(state, onehot, v, mask)
        return self._finish(o), state

    def _causal_sums(self, q, kq, v, oh, dl, e, top, u0, c0, grad):
        """Numerator (b, h, n, d) and denominator (b, h, n) of causal attention: earlier chunks through
        the per-code memory, the own chunk exactly (masked scores of the quantized keys)."""
        b, h, n, d = q.shape
        m = min(self.opts.chunk, n)

        def chunks(t: Tensor) -> Tensor:
            return rearrange(pad_to_multiple(t, m, dim=2)[0], "b h (c l) ... -> b h c l ...", l=m)

        qc, kc, vc, ohc, dlc, ec, topc = (chunks(t) for t in (q, kq, v, oh, dl, e, top))
        u = ohc.transpose(-1, -2) @ vc  # (b, h, c, S, d): each chunk's code sums
        cnt = ohc.sum(3)  # (b, h, c, S)

        def before(t: Tensor, t0: Tensor | None) -> Tensor:
            """Exclusive prefix sum over chunks, plus the carried-in memory."""
            t = torch.cat([torch.zeros_like(t[:, :, :1]), t[:, :, :-1]], 2).cumsum(2)
            return t if t0 is None else t + t0[:, :, None]

        num = ec @ before(u, u0)
        den = (ec * before(cnt, c0)[:, :, :, None]).sum(-1)
        if grad:
            w = before(torch.einsum("bhcls,bhcld,bhcle->bhcsde", ohc, dlc, vc), None)
            dsum = before(ohc.transpose(-1, -2) @ dlc, None)
            num = num + torch.einsum("bhcls,bhcld,bhcsde->bhcle", ec, qc, w) / math.sqrt(d)
            den = den + torch.einsum("bhcls,bhcld,bhcsd->bhcl", ec, qc, dsum) / math.sqrt(d)
        s = qc @ kc.transpose(-1, -2) / math.sqrt(d) - topc
        real = ohc.sum(-1)  # 1 for a kept key, 0 for padding (in the sequence or past its end)
        a = torch.exp(s.masked_fill(~causal_keep(m, m, q.device), float("-inf"))) * real[:, :, :, None, :]
        num, den = num + a @ vc, den + a.sum(-1)
        num = rearrange(num, "b h c l d -> b h (c l) d")[:, :, :n]
        return num, rearrange(den, "b h c l -> b h (c l)")[:, :, :n]

    def _onehot(self, z: Tensor, mask: Tensor | None, dtype) -> Tensor:
        """One-hot code assignments (batch, kv, seq, S); all-zero rows at padded tokens."""
        onehot = F.one_hot(z, self.opts.codebook_size).to(dtype)
        return onehot if mask is None else onehot * mask[:, None, :, None].to(dtype)

    def _remember(self, state: CodebookState, onehot: Tensor, v: Tensor, mask: Tensor | None) -> None:
        """Add the new tokens' values v (batch, kv, seq, d) and counts to the per-code memory."""
        if state.u.shape[1:3] != (self.n_kv_heads, self.opts.codebook_size):
            raise ShapeError(f"{self.name}: the state's memory is {tuple(state.u.shape[1:3])}, this layer needs "
                             f"({self.n_kv_heads}, {self.opts.codebook_size}); use this layer's init_state()")
        if mask is not None:
            v = v * mask[:, None, :, None].to(v.dtype)
        state.u = state.u + onehot.transpose(-1, -2) @ v
        state.count = state.count + onehot.sum(2)
