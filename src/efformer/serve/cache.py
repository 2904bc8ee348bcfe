"""Decode state for a running batch whose rows join and leave: a paged KV cache for softmax layers,
right-aligned windows for sliding-window layers, and fixed-size slots for recurrent and SSM layers.

Paging follows "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023): the keys and values of every sequence live in fixed-size blocks of one pool per
layer; a sequence owns a block table (one list of block ids, shared by all layers), so joining a
batch copies nothing and finishing returns the blocks to the free list. A softmax layer reads a
step's keys by gathering each row's blocks (:class:`PagedKVState` stands in for ``KVState``, so the
mixer runs unchanged); rows shorter than the longest are masked, which is exact for one decode query.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from efformer.errors import CapabilityError, EfformerError, ShapeError
from efformer.mixers.base import Mixer, MixerState
from efformer.mixers.kv_policies import StreamingKVState, dequantize_int8, quantize_int8
from efformer.mixers.local import PatternKVState
from efformer.mixers.softmax import KVState


class CacheFullError(EfformerError):
    """The block pool has too few free blocks for a request (wait for others to finish, or add blocks)."""


class BlockPool:
    """A free list of ``num_blocks`` KV blocks of ``block_size`` tokens, shared by every layer."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def allocate(self, tokens: int) -> list[int]:
        """Block ids for ``tokens`` tokens, taken from the free list (CacheFullError if too few)."""
        need = self.blocks_for(tokens)
        if need > len(self._free):
            raise CacheFullError(f"{tokens} tokens need {need} KV blocks but only {len(self._free)} of "
                                 f"{self.num_blocks} are free; wait for running requests or raise num_blocks")
        return [self._free.pop() for _ in range(need)]

    def release(self, blocks: list[int]) -> None:
        """Return ``blocks`` to the free list."""
        self._free.extend(reversed(blocks))
        blocks.clear()


@dataclass
class LayerPages:
    """One softmax layer's share of the pool: keys/values (slots, kv_heads, d) and positions (slots,);
    int8 pages hold codes plus per-token fp32 scales ks, vs (slots, kv_heads, 1) and dequantize to ``dtype``."""

    k: Tensor
    v: Tensor
    pos: Tensor
    ks: Tensor | None = None
    vs: Tensor | None = None
    dtype: torch.dtype = torch.float32

    @classmethod
    def empty(cls, pool: BlockPool, kv_heads: int, head_dim: int, device, dtype, *, int8: bool = False) -> LayerPages:
        """Storage for every block of ``pool`` (int8 codes and scales when ``int8``)."""
        slots = pool.num_blocks * pool.block_size
        store = torch.int8 if int8 else dtype
        scales = [torch.ones(slots, kv_heads, 1, device=device) for _ in range(2)] if int8 else [None, None]
        return cls(torch.zeros(slots, kv_heads, head_dim, device=device, dtype=store),
                   torch.zeros(slots, kv_heads, head_dim, device=device, dtype=store),
                   torch.zeros(slots, dtype=torch.long, device=device), *scales, dtype=dtype)

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store keys/values (tokens, kv_heads, d) at ``slots`` (quantized per token for int8 pages)."""
        for store, scale, x in ((self.k, self.ks, k), (self.v, self.vs, v)):
            if scale is None:
                store.index_copy_(0, slots, x.to(store.dtype))
            else:
                codes, s = quantize_int8(x)
                store.index_copy_(0, slots, codes)
                scale.index_copy_(0, slots, s)

    def read(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values at ``slots`` (any shape S) -> (*S, kv_heads, d) in the model's dtype."""
        if self.ks is None:
            return self.k[slots], self.v[slots]
        return (dequantize_int8(self.k[slots], self.ks[slots], self.dtype),
                dequantize_int8(self.v[slots], self.vs[slots], self.dtype))


@dataclass(kw_only=True)
class PagedKVState(KVState):
    """A softmax layer's KV cache for a batch of rows, each row a block table into shared pages."""

    pages: LayerPages
    tables: list[list[int]]  # per row: block ids (the list object is shared with the other layers)
    lengths: list[int]  # per row: tokens cached in this layer
    block_size: int
    stands_in_for: ClassVar[type] = KVState
    _view: tuple | None = field(default=None, repr=False)

    @classmethod
    def for_tables(cls, pages: LayerPages, tables: list[list[int]], block_size: int) -> PagedKVState:
        """An empty cache over the given block tables."""
        none = pages.k.new_zeros(0)
        return cls(k_buf=none, v_buf=none, pos_buf=none.long(), keep_buf=none.bool(), pages=pages, tables=tables,
                   lengths=[0] * len(tables), block_size=block_size)

    def batch_size(self) -> int:
        """Rows (sequences) in the cache."""
        return len(self.tables)

    def _slots(self, starts: list[int], n: int) -> Tensor:
        """Pool slots (rows, n) of tokens starts[r] .. starts[r] + n - 1 of each row."""
        width = max(len(t) for t in self.tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.long,
                             device=self.pages.pos.device)
        j = torch.tensor(starts, device=table.device)[:, None] + torch.arange(n, device=table.device)
        return table.gather(1, (j // self.block_size).clamp(max=width - 1)) * self.block_size + j % self.block_size

    def append(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None = None, *,
               graph: bool | None = None) -> PagedKVState:
        """Write keys/values (rows, kv_heads, n, d) and positions (rows, n) into each row's blocks."""
        if graph or torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise CapabilityError("the paged KV cache is for inference: run under torch.no_grad()")
        if keep is not None and not bool(keep.all()):
            raise ShapeError("the paged KV cache takes unpadded rows (keep-mask all True)")
        n = k.shape[2]
        for t, length in zip(self.tables, self.lengths, strict=True):
            if length + n > len(t) * self.block_size:
                raise CacheFullError(f"a row's block table holds {len(t) * self.block_size} tokens, not "
                                     f"{length + n}; reserve blocks for prompt + max_tokens")
        slots = self._slots(self.lengths, n).flatten()
        self.pages.write(slots, k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1))
        self.pages.pos.index_copy_(0, slots, positions.flatten())
        self.lengths = [x + n for x in self.lengths]
        self._view = None
        return self

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """k, v (rows, kv_heads, T, d), positions and keep (rows, T), T the longest row (memoised per step)."""
        if self._view is None:
            t = max(self.lengths)
            slots = self._slots([0] * len(self.tables), t)
            keep = torch.arange(t, device=slots.device)[None] < torch.tensor(self.lengths, device=slots.device)[:, None]
            slots = torch.where(keep, slots, 0)
            k, v = self.pages.read(slots)
            self._view = (k.transpose(1, 2), v.transpose(1, 2), self.pages.pos[slots], keep)
        return self._view

    @property
    def k(self) -> Tensor:
        """Cached keys (rows, kv_heads, T, d), zero past each row's length."""
        return self._gathered()[0]

    @property
    def v(self) -> Tensor:
        """Cached values (rows, kv_heads, T, d)."""
        return self._gathered()[1]

    @property
    def positions(self) -> Tensor:
        """Positions of the cached keys (rows, T)."""
        return self._gathered()[2]

    @property
    def keep(self) -> Tensor:
        """Keep-mask (rows, T): False past each row's length."""
        return self._gathered()[3]

    @property
    def padded(self) -> bool:  # a dataclass field in KVState, derived here
        """Whether rows differ in length (then attention needs the keep-mask)."""
        return len(set(self.lengths)) > 1

    @padded.setter
    def padded(self, value: bool) -> None:
        pass  # derived from the lengths

    def select(self, index: Tensor) -> PagedKVState:
        """The cache of rows ``index`` (their blocks stay owned: the engine frees finished rows' tables)."""
        rows = index.tolist()
        new = dataclasses.replace(self, tables=[self.tables[r] for r in rows],
                                  lengths=[self.lengths[r] for r in rows], _view=None)
        new.seen = self.seen
        return new


# ---- which kind of slot each layer needs ------------------------------------------------------------
KINDS = ("paged", "window", "fixed", "streaming")


def state_kind(mixer: Mixer) -> str:
    """How a running batch holds this layer's state: "paged" (softmax KV), "window" (a pattern that
    depends on i - j only, right-aligned), or "fixed" (a state whose size does not grow with time)."""
    probe = mixer.init_state(1, "cpu", torch.float32)
    if type(probe) is KVState:
        return "paged"
    if isinstance(probe, PatternKVState):
        if mixer.capabilities.packing:  # relative pattern: shifting a row's indices changes nothing
            return "window"
    elif not isinstance(probe, KVState):
        p = next(mixer.parameters(), None)
        st = mixer.init_state(1, p.device if p is not None else "cpu", p.dtype if p is not None else torch.float32)
        before = _shapes(st)
        with torch.no_grad():
            x = torch.randn(1, 3, mixer.d_model, device=p.device if p is not None else "cpu",
                            dtype=p.dtype if p is not None else torch.float32)
            mixer(x, state=st)
        if _shapes(st) == before:
            return "fixed"
    raise CapabilityError(f"mixer {mixer.name!r}: its decode state ({type(probe).__name__}) depends on absolute "
                          "sequence indices, so rows cannot join a running batch; serve it with static batches "
                          "(model.generate) or pick softmax, a sliding window or a recurrent mixer")


def _shapes(state: MixerState) -> list:
    return [tuple(v.shape) if isinstance(v, Tensor) else None for v in
            (getattr(state, f.name) for f in dataclasses.fields(state))]


def merge_states(kind: str, states: list[MixerState]) -> MixerState:
    """One state holding the rows of ``states`` in order (a request joining the running batch)."""
    if kind == "paged":
        first = states[0]
        return dataclasses.replace(first, tables=[t for s in states for t in s.tables],
                                   lengths=[n for s in states for n in s.lengths], _view=None)
    if kind == "window":
        return _merge_windows(states)
    if kind == "streaming":
        return StreamingKVState.merge(states)
    merged = dataclasses.replace(states[0], **{
        f.name: _cat([getattr(s, f.name) for s in states]) for f in dataclasses.fields(states[0])})
    merged.seen = max(s.seen for s in states)
    return merged


def _cat(values: list):
    if isinstance(values[0], Tensor):
        return torch.cat(values, 0)
    return values[0]  # None or a constant shared by every row


def _merge_windows(states: list[PatternKVState]) -> PatternKVState:
    """Right-align each row's window: row r's sequence indices shift by S - seen_r (S the largest seen),
    and shorter windows are left-padded with masked entries, so every row shares one index axis."""
    top = max(s.seen for s in states)
    width = max(s.length for s in states)
    parts: dict[str, list[Tensor]] = {name: [] for name in PatternKVState.time_dims}
    for s in states:
        pad = width - s.length
        for name, d in PatternKVState.time_dims.items():
            x = getattr(s, name).narrow(d, 0, s.length)
            shape = list(x.shape)
            shape[d] = pad
            filler = x.new_zeros(shape)
            parts[name].append(torch.cat([filler, x], d))
    index = (top - width + torch.arange(width, device=states[0].k_buf.device)).expand(
        sum(s.batch_size() for s in states), width)
    out = dataclasses.replace(states[0], **{name: torch.cat(v, 0) for name, v in parts.items()})
    out.index_buf, out.length = index.contiguous(), width
    out.padded = not bool(out.keep.all())
    out.seen = top
    return out
