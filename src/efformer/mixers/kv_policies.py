"""KV-cache storage policies for softmax layers: attention sinks with window eviction, and int8 codes.

Streaming: "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., 2023,
StreamingLLM). A layer keeps its first ``sinks`` tokens and its last ``window`` tokens, so
generation can run without bound in O(sinks + window) memory. As in StreamingLLM, positions are
assigned *within the cache*: keys are stored unrotated, and at every call the kept keys get positions
0, 1, ... in cache order (padding not counted) and the new queries the positions that follow; the
rotary (or bias) scheme is applied to those. Before a call of n new tokens the window evicts its
oldest entries until (window - n) remain ("evict for space"), the new tokens attend causally over
sinks + window + themselves, and afterwards the first tokens fill the sinks and the rest enter the
window (its last ``window`` entries stay). So a one-token decode step attends to at most
sinks + window keys, and between calls the cache never holds more; a prefill longer than the window
attends to all of its own tokens (transiently more), as StreamingLLM's prefill does.

Int8: symmetric absmax quantization with **per-token** scales, for keys and values alike: each
(row, head, token) vector is stored as int8 codes round(x / s) with one fp32 scale s = max|x| / 127,
so every element is off by at most s / 2 (half a quantization step), and a decode step quantizes only
its own token (no scale of an older token ever changes). "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache" (Liu et al., 2024) finds keys quantize better per channel at 2 bits; at 8
bits per-token keys stayed within 1% of the logit range here (tests/models/test_kv_policy.py).
Storage per token and head is d bytes + 4 (scale) instead of 2d (bf16) or 4d (fp32) bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from efformer.errors import ConfigError, ShapeError
from efformer.mixers.base import MixerState
from efformer.mixers.softmax import KVState

INT8_MAX = 127


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-vector absmax int8: x (..., d) -> codes (..., d) int8 and fp32 scales (..., 1)."""
    scale = x.detach().abs().amax(-1, keepdim=True).float() / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero vector: any scale, codes 0
    codes = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """codes (..., d) int8 and scales (..., 1) -> values (..., d) in ``dtype``."""
    return (codes.float() * scale).to(dtype)


@dataclass(kw_only=True)
class Int8KVState(KVState):
    """A :class:`KVState` whose keys and values are int8 codes with per-token fp32 scales (b, kv, t, 1)."""

    ks_buf: Tensor
    vs_buf: Tensor
    dtype: torch.dtype = torch.float32  # the model's dtype: what ``k``/``v`` dequantize to
    stands_in_for: ClassVar[type] = KVState
    time_dims: ClassVar[dict[str, int]] = {**KVState.time_dims, "ks_buf": 2, "vs_buf": 2}

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, device, dtype, **more: Tensor) -> Int8KVState:
        """An empty int8 cache (capacity 0) that dequantizes to ``dtype``."""
        base = KVState.empty(batch, kv_heads, head_dim, device, torch.int8)
        scales = torch.zeros(batch, kv_heads, 0, 1, device=device)
        return cls(k_buf=base.k_buf, v_buf=base.v_buf, pos_buf=base.pos_buf, keep_buf=base.keep_buf,
                   ks_buf=scales, vs_buf=scales.clone(), dtype=dtype, **more)

    def append(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None = None, *,
               graph: bool | None = None) -> Int8KVState:
        """Quantize keys/values (b, kv, n, d) per token and append them with positions and keep (b, n)."""
        if keep is not None and not self.padded:
            self.padded = not bool(keep.all())
        (kc, ks), (vc, vs) = quantize_int8(k), quantize_int8(v)
        # codes carry no gradient, so nothing autograd saved is ever overwritten: always write in place
        self._write({"k_buf": kc, "v_buf": vc, "ks_buf": ks, "vs_buf": vs, "pos_buf": positions, "keep_buf": keep},
                    False)
        return self

    @property
    def k(self) -> Tensor:
        """Dequantized keys (b, kv, t, d)."""
        t = self.length
        return dequantize_int8(self.k_buf[:, :, :t], self.ks_buf[:, :, :t], self.dtype)

    @property
    def v(self) -> Tensor:
        """Dequantized values (b, kv, t, d)."""
        t = self.length
        return dequantize_int8(self.v_buf[:, :, :t], self.vs_buf[:, :, :t], self.dtype)


def kv_bytes(state: MixerState) -> int:
    """Bytes of the cached keys and values of ``state`` (codes and scales for int8; live entries only)."""
    if isinstance(state, StreamingKVState):
        return sum(x.nbytes for x in (state.sk, state.sv, state.wk, state.wv))
    if isinstance(state, KVState):
        t = state.length
        names = ("k_buf", "v_buf", "ks_buf", "vs_buf") if isinstance(state, Int8KVState) else ("k_buf", "v_buf")
        return sum(getattr(state, n)[:, :, :t].nbytes for n in names)
    raise ShapeError(f"kv_bytes counts KV caches, not {type(state).__name__}")


@dataclass(kw_only=True)
class StreamingKVState(MixerState):
    """Sinks + window KV cache (see the module docstring): unrotated sink keys/values (b, kv, S, d) with a
    keep-mask (b, S) (the first S tokens of each row, left-aligned), and the window (b, kv, w, d), w <= W,
    right-aligned with a keep-mask (b, w)."""

    sk: Tensor
    sv: Tensor
    skeep: Tensor
    wk: Tensor
    wv: Tensor
    wkeep: Tensor
    sinks: int
    window: int
    sinks_full: bool = False  # every row's sink slots hold tokens: new unpadded tokens all enter the window
    stands_in_for: ClassVar[type] = KVState
    in_cache_positions: ClassVar[bool] = True  # softmax attends through :meth:`extend`

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, device, dtype, *, sinks: int,
              window: int) -> StreamingKVState:
        """An empty cache of ``sinks`` sink slots and a window of at most ``window`` tokens."""
        for name, value, low in (("sinks", sinks, 0), ("window", window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(name, value, f"an integer >= {low}")
        z = torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype)
        s = torch.zeros(batch, kv_heads, sinks, head_dim, device=device, dtype=dtype)
        return cls(sk=s, sv=s.clone(), skeep=torch.zeros(batch, sinks, dtype=torch.bool, device=device),
                   wk=z, wv=z.clone(), wkeep=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                   sinks=sinks, window=window)

    @property
    def size(self) -> int:
        """Token slots held per row (sink slots + window entries): at most sinks + window."""
        return self.sk.shape[2] + self.wk.shape[2]

    def extend(self, k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Make room for, attend with, and store n new unrotated keys/values (b, kv, n, d) with keep (b, n).

        Returns the keys and values to attend over (b, kv, T, d) (sinks, surviving window, new tokens,
        all unrotated), their keep-mask (b, T) and in-cache positions (b, T); the new queries' positions
        are the last n of those."""
        b, _, n, _ = k.shape
        m = keep if keep is not None else torch.ones(b, n, dtype=torch.bool, device=k.device)
        room = max(self.window - n, 0)  # evict for space: the window keeps (window - n) entries
        w = self.wk.shape[2]
        wk, wv, wkeep = (x.narrow(-2 if x.dim() == 4 else 1, w - min(w, room), min(w, room))
                         for x in (self.wk, self.wv, self.wkeep))
        keys, values = torch.cat([self.sk, wk, k], 2), torch.cat([self.sv, wv, v], 2)
        kept = torch.cat([self.skeep, wkeep, m], 1)
        positions = (kept.long().cumsum(1) - 1).clamp(min=0)
        width = min(self.window, wk.shape[2] + n)
        if keep is None and self.sinks_full:  # the decode fast path: append to the right-aligned window
            self.wk, self.wv, self.wkeep = (torch.cat([a, b], d).narrow(d, a.shape[d] + n - width, width)
                                            for a, b, d in ((wk, k, 2), (wv, v, 2), (wkeep, m, 1)))
            return keys, values, kept, positions
        # the row's first `sinks` real tokens are its sinks; later ones enter the window
        rank = self.skeep.sum(1, keepdim=True) + m.long().cumsum(1) - 1
        to_sink = m & (rank < self.sinks)
        self.sk, self.sv, self.skeep = _compact(torch.cat([self.sk, k], 2), torch.cat([self.sv, v], 2),
                                                torch.cat([self.skeep, to_sink], 1), self.sinks, left=True)
        self.sinks_full = bool(self.skeep.all())
        self.wk, self.wv, self.wkeep = _compact(torch.cat([wk, k], 2), torch.cat([wv, v], 2),
                                                torch.cat([wkeep, m & ~to_sink], 1), width, left=False)
        return keys, values, kept, positions

    @classmethod
    def merge(cls, states: list[StreamingKVState]) -> StreamingKVState:
        """One cache holding the rows of ``states`` in order; shorter windows are left-padded (masked)."""
        width = max(s.wk.shape[2] for s in states)

        def pad(x: Tensor, d: int) -> Tensor:
            shape = list(x.shape)
            shape[d] = width - x.shape[d]
            return torch.cat([x.new_zeros(shape), x], d)

        first = states[0]
        out = dataclasses.replace(
            first, sk=torch.cat([s.sk for s in states]), sv=torch.cat([s.sv for s in states]),
            skeep=torch.cat([s.skeep for s in states]), wk=torch.cat([pad(s.wk, 2) for s in states]),
            wv=torch.cat([pad(s.wv, 2) for s in states]), wkeep=torch.cat([pad(s.wkeep, 1) for s in states]),
            sinks_full=all(s.sinks_full for s in states))
        out.seen = max(s.seen for s in states)
        return out


def _compact(k: Tensor, v: Tensor, keep: Tensor, width: int, *, left: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The kept entries of k, v (b, kv, T, d) and keep (b, T) moved to the left (right) end, in order,
    cut to ``width`` entries."""
    order = torch.sort((~keep if left else keep).to(torch.int8), dim=1, stable=True).indices
    idx = order[:, :width] if left else order[:, order.shape[1] - width:]
    gather = idx[:, None, :, None].expand(k.shape[0], k.shape[1], width, k.shape[3])
    return k.gather(2, gather), v.gather(2, gather), keep.gather(1, idx)
