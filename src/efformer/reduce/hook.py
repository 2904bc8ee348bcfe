"""One token-reduction hook between the blocks of any encoder: schedule, token sizes, sources, unmerge.

Paper: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023) for the hook's contract: the
class token is kept, every token carries its size (how many input tokens it stands for), attention
adds log(size) to the key scores ("proportional attention"), and the sources of every token are
tracked so that :func:`unmerge` can give back the full grid. The methods that pick what to merge or
prune live in :mod:`efformer.reduce.methods`.

The model calls the hook (``Backbone.reducer`` / ``ImageClassifier.reducer``, None by default):
``begin`` before a stack of blocks, ``between`` after each block but the last, ``end`` after the
stack (which unmerges, so pooling, masks and patch merging see the full grid). Where the tokens are
reduced is ``where``: ``"mid"`` (ToMe's placement, the default) merges inside every block, between
the mixer's residual and the FFN's (``Block.reduce_mid``), so each FFN already runs on the reduced
tokens; ``"between"`` merges after every block but the last of a stack. A stack may also be reduced
``per_block``: every block's merge is undone after its FFN (windowed merging in Swin stages, whose
next block's windows differ), see :mod:`efformer.reduce.windowed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.nn.positional import PositionalContext, Rotation


class ReduceError(ConfigError):
    """A token-reduction setting cannot be used: names the field, the value and the fix."""


class Schedule(pydantic.BaseModel):
    """How many tokens each reduction point removes: constant ``r``, ToMe's ``inflect``, a list, or ``keep``.

    ``r`` int: that many per point (with ``inflect``, linear from int(r(1 - inflect)) to 2r minus it,
    ToMe's schedule; -1 is the paper's decreasing 2r -> 0), capped per point at (t - protected) // 2
    as in ToMe. ``r`` list: exactly these per point (refused where a value exceeds the cap). ``keep``:
    the fraction of the stack's tokens left after its last point, spread evenly over the points.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    r: int | list[int] | None = pydantic.Field(None, description="tokens removed per reduction point")
    inflect: float = pydantic.Field(0.0, ge=-1.0, le=1.0, description="ToMe's slope: 0 constant, -1 decreasing")
    keep: float | None = pydantic.Field(None, gt=0.0, le=1.0, description="fraction of tokens kept at the end")

    @pydantic.model_validator(mode="after")
    def _one(self) -> Schedule:
        if (self.r is None) == (self.keep is None):
            raise ValueError("give exactly one of r (int or per-point list) or keep (a fraction in (0, 1])")
        rs = self.r if isinstance(self.r, list) else [self.r] if self.r is not None else []
        if any(isinstance(v, bool) or v < 0 for v in rs):
            raise ValueError(f"r must hold integers >= 0, got {self.r!r}")
        return self

    def per_point(self, t: int, points: int, protected: int, offset: int = 0, total: int | None = None) -> list[int]:
        """r for each of ``points`` reduction points of a stack entered by ``t`` tokens (checked against the caps)."""
        total = points if total is None else total
        if isinstance(self.r, list):
            if len(self.r) != total:
                raise ReduceError("schedule.r", self.r, f"a per-point list needs one value per reduction point: "
                                  f"this model has {total} (every block with where='mid', every block but the last "
                                  "of each stack with where='between'); "
                                  "give that many or a single int")
            rs = self.r[offset : offset + points]
            _check_caps(rs, t, protected, offset)
            return rs
        if self.keep is not None:
            return _keep_schedule(self.keep, t, points, protected)
        lo = int(self.r * (1 - self.inflect))
        step = (2 * self.r - 2 * lo) / max(points - 1, 1)  # ToMe's parse_r: lo -> 2r - lo, truncated
        rs = [int(lo + step * i) for i in range(points)] if points > 1 else [self.r] * points
        capped = []
        for r in rs:  # ToMe's rule: at most half of the unprotected tokens per point
            r = min(r, cap(t, protected))
            capped.append(r)
            t -= r
        return capped


    def per_block(self, points: int, offset: int, total: int) -> list[int]:
        """r for each of ``points`` reduction points that each start from the full grid (per-block stacks):
        an int r at every point, or the list's values; a fraction to keep or a slope has no meaning there."""
        if self.keep is not None or self.inflect:
            raise ReduceError("schedule", self.model_dump(exclude_defaults=True), "windowed merging undoes each "
                              "block's merge after its FFN, so a cumulative keep-fraction or slope has no meaning; "
                              "give r per window as an int or a per-point list")
        if isinstance(self.r, list):
            if len(self.r) != total:
                raise ReduceError("schedule.r", self.r, f"a per-point list needs one value per reduction point: "
                                  f"this model has {total}; give that many or a single int")
            return self.r[offset : offset + points]
        return [self.r] * points


def cap(t: int, protected: int) -> int:
    """The most tokens one point may remove from t tokens: (t - protected) // 2 (bipartite halves)."""
    return max(t - protected, 0) // 2


def _check_caps(rs: list[int], t: int, protected: int, offset: int) -> None:
    for i, r in enumerate(rs):
        if r > cap(t, protected):
            raise ReduceError(f"schedule.r[{offset + i}]", r, f"{t} tokens ({protected} protected) allow at most "
                              f"(t - {protected}) // 2 = {cap(t, protected)} at this point (fewer would leave less "
                              "than one token per bipartite pair); lower it or use an int r, which is capped")
        t -= r


def _keep_schedule(keep: float, t: int, points: int, protected: int) -> list[int]:
    target = max(round(keep * t), protected + 1)
    remove = t - target
    rs, left = [], remove
    for i in range(points):  # an even share of what is left, more where later caps would fall short
        r = min(-(-left // (points - i)), cap(t, protected))
        while r < cap(t, protected) and left - r > _most_removed(t - r, points - i - 1, protected):
            r += 1
        rs.append(r)
        t, left = t - r, left - r
    if left > 0:
        raise ReduceError("schedule.keep", keep, f"keeping {target} of {t + sum(rs)} tokens needs {remove} removed, "
                          f"but {points} reduction points can remove at most {sum(rs)} (each at most half of the "
                          "unprotected tokens); raise keep or use a deeper model")
    return rs


def _most_removed(t: int, points: int, protected: int) -> int:
    """How many of t tokens ``points`` capped reductions can remove at most (halving each time)."""
    removed = 0
    for _ in range(points):
        r = cap(t - removed, protected)
        removed += r
    return removed


def as_schedule(schedule: Any) -> Schedule:
    """A Schedule from an int (constant r), a list (per point), a dict or a Schedule; ReduceError if invalid."""
    if isinstance(schedule, Schedule):
        return schedule
    data = {"r": schedule} if isinstance(schedule, int | list) and not isinstance(schedule, bool) else schedule
    if not isinstance(data, dict):
        raise ReduceError("schedule", schedule, "an int r, a per-point list of ints, or a dict such as "
                          "{'r': 8, 'inflect': -1} or {'keep': 0.5}")
    try:
        return Schedule.model_validate(data)
    except pydantic.ValidationError as e:
        raise ReduceError("schedule", schedule, e.errors()[0]["msg"]) from None


@dataclass
class Tokens:
    """The reduced tokens of one stack: x (b, t, d), sizes (b, t), keep-mask (b, t) or None, and the
    source of every input token: ``source`` (b, n) gives the index (in x) of the token it went into."""

    x: Tensor
    size: Tensor
    mask: Tensor | None
    source: Tensor
    positions: Tensor


@dataclass
class Assignment:
    """One reduction step: every token i goes into token ``dst[:, i]`` (a token with dst == itself is
    kept), adding ``weight[:, i]`` (1: merged, 0: pruned) times its size to it. ``matrix`` (b, t', t),
    when given, spreads each token over several kept ones (Token Transforming); ``dst`` then only
    says where unmerge sends it."""

    dst: Tensor
    weight: Tensor | None = None
    matrix: Tensor | None = None


def combine(tok: Tokens, a: Assignment) -> tuple[Tokens, Tensor]:
    """Apply one Assignment (size-weighted means, sizes, masks, sources); returns the new Tokens and the
    kept indices (b, t') into the old tokens, in their old order."""
    x, b, t = tok.x, tok.x.shape[0], tok.x.shape[1]
    ar = torch.arange(t, device=x.device).expand(b, t)
    is_rep = a.dst == ar
    slot_of = is_rep.long().cumsum(1) - 1  # kept tokens keep their order
    slot = slot_of.gather(1, a.dst)
    t_out = int(is_rep[0].sum())
    keep = ar[is_rep].view(b, t_out)
    w = tok.size if a.weight is None else tok.size * a.weight
    if tok.mask is not None:  # padding adds nothing: a real token merged with padding is unchanged
        w = w * tok.mask.to(w.dtype)
    if a.matrix is None:
        new_x, den = _merge_sources(x, w, keep, ar[~is_rep].view(b, t - t_out), slot)
    else:
        new_x, den, _ = transform_tokens(x, w, a.matrix)
    mask = None if tok.mask is None else den > 0
    return Tokens(new_x, den, mask, slot.gather(1, tok.source), tok.positions.gather(1, keep)), keep


def take(x: Tensor, idx: Tensor) -> Tensor:
    """Rows x[b, idx[b, i]] (b, k, d) for x (b, t, d) and idx (b, k): one index_select over the flattened
    batch, far cheaper on CPU than gather with an index expanded over d."""
    b, t, d = x.shape
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * t).reshape(-1)
    return x.reshape(b * t, d).index_select(0, flat).view(b, idx.shape[1], d)


def _merge_sources(x: Tensor, w: Tensor, keep: Tensor, src: Tensor, slot: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted means where the r tokens ``src`` (b, r) go into their slots among the kept ones
    (b, t'); only the rows that receive a token are recomputed, the others stay exactly as they were."""
    b, t_out = keep.shape
    d = x.shape[2]
    q = slot.gather(1, src)  # (b, r): the kept token each source goes into
    ws = w.gather(1, src)
    w_keep = w.gather(1, keep)
    added = torch.zeros_like(w_keep).scatter_add_(1, q, ws)
    kept_x = take(x, keep)
    flat_q = (q + torch.arange(b, device=q.device)[:, None] * t_out).reshape(-1)
    acc = torch.zeros(b * t_out, d, dtype=x.dtype, device=x.device).index_add_(
        0, flat_q, (take(x, src) * ws[..., None].to(x.dtype)).reshape(-1, d))
    rows = kept_x.reshape(b * t_out, d).index_select(0, flat_q)
    wq = w_keep.reshape(-1)[flat_q, None].to(x.dtype)
    total = (w_keep + added).reshape(-1)[flat_q, None].to(x.dtype)
    merged = (rows * wq + acc.index_select(0, flat_q)) / total.clamp(min=1e-30)
    merged = torch.where(added.reshape(-1)[flat_q, None] > 0, merged, rows)  # pruned (weight 0): unchanged
    out = kept_x.reshape(b * t_out, d).index_copy(0, flat_q, merged)
    return out.view(b, t_out, d), w_keep + added


def _exact_where_single(x: Tensor, rep: Tensor, count: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """num / den, except that a token made of one input (count <= 1) is that input, exactly (x * s / s can round)."""
    kept_x = x.gather(1, rep[..., None].expand(*rep.shape, x.shape[2]))
    return torch.where((count <= 1)[..., None], kept_x, num / den.clamp(min=1e-30)[..., None].to(x.dtype))


def transform_tokens(x: Tensor, size: Tensor, matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Token Transforming's many-to-many step: x (b, t, d), sizes (b, t), matrix M (b, t', t) >= 0 ->
    (M diag(s) x / M s (b, t', d), new sizes M s (b, t'), each row's largest input (b, t')). A selection
    matrix (one 1 per row) gives exactly the selected tokens (pruning); a 0/1 matrix whose columns hold
    one 1 each gives size-weighted merging."""
    if matrix.dim() != 3 or matrix.shape[0] != x.shape[0] or matrix.shape[2] != x.shape[1]:
        raise ShapeError(f"transform_tokens: matrix must be (batch, t_out, {x.shape[1]}) for x {tuple(x.shape)}, "
                         f"got {tuple(matrix.shape)}")
    if bool((matrix < 0).any()):
        raise ShapeError("transform_tokens: matrix entries must be >= 0 (weights of a weighted mean)")
    mw = matrix * size[:, None, :].to(matrix.dtype)
    den = mw.sum(-1)
    num = mw.to(x.dtype) @ x
    rep = mw.argmax(-1)
    return _exact_where_single(x, rep, (mw > 0).sum(-1), num, den), den, rep


def unmerge(x: Tensor, source: Tensor) -> Tensor:
    """Reduced tokens (b, t, d) back to the full sequence (b, n, d): input token j gets x[source[:, j]]."""
    if source.shape[0] != x.shape[0] or (source.numel() and int(source.max()) >= x.shape[1]):
        raise ShapeError(f"unmerge: source {tuple(source.shape)} does not index tokens {tuple(x.shape)}; pass the "
                         "source tracked with these tokens (reducer.last.source)")
    return take(x, source)


class LogSizeBias(nn.Module):
    """Proportional attention: the model's own score bias (or none) plus log(size) of every key, (b, 1, 1, t)."""

    def __init__(self, inner: nn.Module | None, log_size: Tensor):
        super().__init__()
        self.inner, self.log_size = inner, log_size

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Additive bias broadcastable to (b, h, n, t)."""
        bias = self.log_size[:, None, None, :]
        return bias if self.inner is None else self.inner(q_pos, k_pos) + bias


def _gather_rotation(rot: Rotation | None, keep: Tensor) -> Rotation | None:
    if rot is None:
        return None
    idx = keep[:, None, :, None]

    def g(t: Tensor) -> Tensor:
        t = t.expand(keep.shape[0], *t.shape[1:])
        return t.gather(2, idx.expand(-1, t.shape[1], -1, t.shape[3]))
    return replace(rot, q_cos=g(rot.q_cos), q_sin=g(rot.q_sin), k_cos=g(rot.k_cos), k_sin=g(rot.k_sin))


@dataclass
class Trace:
    """What the last forward did: token counts (entering each stack, then after each reduction point), the
    last stack's sizes and sources, and the source map of every reduction point."""

    counts: list[int]
    size: Tensor | None = None
    source: Tensor | None = None
    sources: list[Tensor] = field(default_factory=list)  # (b, n) after each reduction point, this forward


class Reducer:
    """The hook a model calls around its blocks (and, with ``where="mid"``, inside them); built by
    :func:`efformer.reduce.apply`."""

    def __init__(self, method, schedule: Schedule, protected: int, stacks: list[int], prop_attn: bool = True,
                 where: str = "between", per_block: list[bool] | None = None):
        # "mid" needs each block's reduce_mid set to :meth:`mid` (apply does it); "between" needs nothing
        self.method, self.schedule, self.protected, self.prop_attn = method, schedule, protected, prop_attn
        self.stacks, self.where = stacks, where  # blocks per stack (stage); where the merges happen
        self.per_block = per_block or [False] * len(stacks)  # stacks whose merges are undone after each block
        self.last = Trace([])
        self._stack, self._active = -1, False

    def points_in(self, blocks: int) -> int:
        """Reduction points of a stack of ``blocks``: every block (mid), or every block but the last (between)."""
        return blocks if self.where == "mid" else max(blocks - 1, 0)

    @property
    def points(self) -> int:
        """Reduction points of the model (see :meth:`points_in`)."""
        return sum(self.points_in(n) for n in self.stacks)

    def begin(self, h: Tensor, mask: Tensor | None, ctx: PositionalContext, *, first: bool = True):
        """Start a stack of blocks: (h (b, n, d), mask, context) unchanged, tracking set up."""
        if ctx.segments is not None:
            raise CapabilityError("token reduction merges tokens across a row, so it cannot run packed rows "
                                  "(segments); pad the sequences into separate rows")
        self._stack = 0 if first else self._stack + 1
        if first:
            self.last = Trace([])
        n = h.shape[1]
        offset = sum(self.points_in(s) for s in self.stacks[: self._stack])
        points = self.points_in(self.stacks[self._stack])
        if self.per_block[self._stack]:  # every point starts from the full grid: r per window, not cumulative
            self._r = self.schedule.per_block(points, offset, self.points)
        else:
            self._r = self.schedule.per_point(n, points, self.protected, offset, self.points)
        self._start(h, mask, ctx)
        self._full_ctx, self._full_mask, self._active = ctx, mask, True
        self.last.counts.append(n)
        return h, mask, ctx

    def _start(self, h: Tensor, mask: Tensor | None, ctx: PositionalContext) -> None:
        b, n = h.shape[:2]
        src = torch.arange(n, device=h.device).expand(b, n)
        size = torch.ones(b, n, device=h.device) if mask is None else mask.float()
        self._tok = Tokens(h, size, mask, src, ctx.positions)
        self._inner_bias, self._ctx, self._mask, self._merged = ctx.bias, ctx, mask, False

    def mid(self, blocks, j: int, h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Inside block j, after its mixer's residual: reduce (h, mask) for the FFN and the blocks after it."""
        if not self._active:  # the block ran outside a reduced forward (e.g. a cached call): untouched
            return h, mask
        h, self._mask, self._ctx = self._reduce(blocks, j, h, mask, self._ctx)
        return h, self._mask

    def between(self, blocks, j: int, h: Tensor, mask: Tensor | None, ctx: PositionalContext):
        """After block j of the stack: reduce by the schedule's r (where="between"), or hand on what block j's
        merge made (where="mid"; a per-block stack unmerges here); returns (h, mask, context) for block j + 1."""
        if self.where == "between":
            return self._reduce(blocks, j, h, mask, ctx)
        if self.per_block[self._stack] and self._merged:
            h = unmerge(h, self._tok.source)
            self._start(h, self._full_mask, self._full_ctx)
        return h, self._mask, self._ctx

    def _reduce(self, blocks, j: int, h: Tensor, mask: Tensor | None, ctx: PositionalContext):
        mixer = blocks[j].mixer
        qk, mixer.last_qk = getattr(mixer, "last_qk", None), None
        r = self._r[j]
        if r == 0:
            self.last.counts.append(h.shape[1])
            return h, mask, ctx
        tok = replace(self._tok, x=h, mask=mask)
        if qk is not None and qk[1].shape[2] != h.shape[1]:
            qk = None  # a subclass's q/k over other tokens (memory, landmarks): use the fallback metric
        view = TokenView(tok, qk, self.protected, self.prop_attn and self._merged, blocks, j, ctx)
        tok, keep = combine(tok, self.method.assign(view, r))
        self._tok, self._merged = tok, True
        self.last.counts.append(tok.x.shape[1])
        self.last.sources.append(tok.source)
        if self.per_block[self._stack]:  # the FFN is pointwise and the next block gets the full grid back
            return tok.x, tok.mask, ctx
        log_size = tok.size.clamp(min=1e-30).log().to(h.dtype)  # padding (size 0) gets -inf: never attended
        bias = LogSizeBias(self._inner_bias, log_size) if self.prop_attn else self._inner_bias
        new = PositionalContext(tok.positions, rotation=_gather_rotation(ctx.rotation, keep), bias=bias)
        return tok.x, tok.mask, new

    def end(self, h: Tensor) -> Tensor:
        """After the stack: the full sequence (b, n, d) again (each input token gets its merged token)."""
        tok = self._tok
        self.last.size, self.last.source, self._active = tok.size, tok.source, False
        return h if not self._merged else unmerge(h, tok.source)


@dataclass
class TokenView:
    """What a method sees at one reduction point: the tokens, this block's (q, k) if recorded, the
    protected prefix, whether sizes bias attention, and the blocks (for one-step-ahead attention)."""

    tok: Tokens
    qk: tuple[Tensor, Tensor] | None
    protected: int
    prop_attn: bool
    blocks: Any
    j: int
    ctx: PositionalContext

    def metric(self) -> Tensor:
        """Token features (b, t, c) to compare: the keys averaged over heads, else the tokens themselves."""
        return self.tok.x if self.qk is None else self.qk[1].mean(1)

    def attention(self) -> Tensor:
        """This block's attention map (b, h, t, t), recomputed from its q, k (with log-size and padding)."""
        if self.qk is None:
            raise CapabilityError("this method needs the attention map, which only mixers that form q and k "
                                  "(softmax and its subclasses) record; use tome or pitome with this mixer")
        return attention_map(*self.qk, self.tok.size if self.prop_attn else None, self.tok.mask)


def attention_map(q: Tensor, k: Tensor, size: Tensor | None, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) [+ log size]) (b, h, n, t) for q (b, h, n, d), k (b, kv, t, d); masked keys get 0."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if size is not None:
        s = s + size.clamp(min=1e-30).log()[:, None, None, :].to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return s.softmax(-1)
