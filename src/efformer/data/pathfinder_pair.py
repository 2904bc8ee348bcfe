"""Pathfinder target pairs: many i.i.d. attempts at growing the two target snakes, run together with numpy.

The original retries whole pairs until one succeeds (`while not success` in snakes2.py); a hard pair
succeeds in ~1 of 3,000 attempts at 64 px, so attempts are batched and the first success is kept,
which samples the same distribution. See `efformer.data.pathfinder` for the algorithm and sources."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from efformer.data.pathfinder_canvas import (
    Paddle,
    PathfinderParams,
    _Canvas,
    _ceil_offset,
    _circle,
    _disc,
    _half,
    _local,
    _Snake,
    _step,
    _turn_weight,
)


@lru_cache(maxsize=4096)
def _footprint(p: PathfinderParams, half: float, theta_deg: int) -> np.ndarray:
    """Offsets (k, 2) from a tail covered by the footprint of a paddle at theta: the original's seed struct."""
    w = _local(*_step((0, 0), math.radians(theta_deg), p.paddle_length), half, p.aa)
    return np.argwhere(w > 0.3) - w.shape[0] // 2


def _free_tails(forbidden: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """(k, 2) pixels from which a footprint with these offsets touches no forbidden pixel (nor leaves the image)."""
    res, r = forbidden.shape[0], int(np.abs(offs).max())
    big = np.ones((res + 2 * r, res + 2 * r), bool)
    big[r:r + res, r:r + res] = forbidden
    ok = np.ones((res, res), bool)
    for dy, dx in offs:
        ok &= ~big[r + dy:r + dy + res, r + dx:r + dx + res]
    return np.argwhere(ok)


# ---- target pair: the original's retry-until-success loop, run on a batch of attempts at once ----------
@dataclass(frozen=True)
class _PairKit:
    """Tables for one (params, margin): paddle masks by relative vector, seed tails, the padded fresh canvas."""

    R: int  # masks reach at most R px from the paddle's start point; the canvas is padded by R
    S: int  # paddle vectors (dy, dx) have |dy|, |dx| <= S
    offs: np.ndarray  # (C, 2) candidate offsets around a pivot, their directions (C,), and back to the near end (C, 2)
    dirs: np.ndarray
    back: np.ndarray
    lib: np.ndarray  # (P, 2R + 3, 2R + 3) float32 masks framed by zeros, so any shifted pixel can be looked up
    spread: tuple[np.ndarray, np.ndarray]  # per mask: offsets (P, Q, 2) and values (P, Q) of its nonzero pixels
    hot: tuple[np.ndarray, np.ndarray]  # the same for its pixels >= 0.8, the only ones that can fail max(..) < 1.8
    tails: np.ndarray  # first-seed tails for each orientation: tails[start[d]:start[d] + count[d]], d = deg + 180
    start: np.ndarray
    count: np.ndarray
    base: np.ndarray  # (res + 2R, res + 2R) float32 fresh occupancy (the padding band), image at [R:R+res]
    dilated: tuple[np.ndarray, np.ndarray, np.ndarray]  # base, offsets, values as above, dilated by the margin disc


@lru_cache(maxsize=16)
def _pair_kit(p: PathfinderParams, margin: int) -> _PairKit:
    hm, L = _half(p) + margin, p.paddle_length
    S = L + 1
    R = S + math.ceil(hm) + 4
    K = 2 * R + 1
    lib = np.zeros(((2 * S + 1) ** 2, K + 2, K + 2), np.float32)
    for i, (dy, dx) in enumerate(np.ndindex(2 * S + 1, 2 * S + 1)):
        w = _local(dy - S, dx - S, hm, p.aa, mask=True)
        r = w.shape[0] // 2
        lib[i, 1 + R - r:2 + R + r, 1 + R - r:2 + R + r] = w
    cv = _Canvas(p, np.random.default_rng(0), margin)
    band = cv.occ > 0.3  # the first seed keeps 2 * seed_distance from the border
    sd2 = 2 * p.seed_distance
    band[:sd2], band[-sd2:], band[:, :sd2], band[:, -sd2:] = True, True, True, True
    per_deg = [_free_tails(band, _footprint(p, hm, d)) for d in range(-180, 180)]
    count = np.array([len(t) for t in per_deg])
    base = np.zeros((p.resolution + 2 * R,) * 2, np.float32)
    base[R:-R, R:-R] = cv.occ
    offs, dirs, back = _circle(L + margin, L)
    d = _disc(margin)
    dlib = _dilate(np.pad(lib, ((0, 0), (margin, margin), (margin, margin))), d)
    dilated = (_dilate(base, d), *_sparse(dlib, 0.0))
    return _PairKit(R, S, offs, dirs, back, lib, _sparse(lib, 0.0), _sparse(lib, 0.8),
                    np.concatenate(per_deg).reshape(-1, 2),
                    np.concatenate([[0], np.cumsum(count)[:-1]]), count, base, dilated)


def _dilate(a: np.ndarray, disc: np.ndarray) -> np.ndarray:
    """Grey dilation of the last two axes of a by the disc offsets (zeros beyond the edges)."""
    r = int(np.abs(disc).max()) if len(disc) else 0
    big = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(r, r), (r, r)])
    h, w = a.shape[-2:]
    return np.max([big[..., r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in disc], 0)


def _sparse(lib: np.ndarray, above: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from the centre (P, Q, 2) and values (P, Q) of each mask's pixels > above (>= for above > 0).

    Rows are padded with copies of their first entry, so scattering them writes that pixel twice, harmlessly.
    """
    keep = lib > above if above == 0 else lib >= above
    q = int(keep.sum((1, 2)).max())
    offs, vals = np.zeros((len(lib), q, 2), int), np.zeros((len(lib), q), np.float32)
    c = (lib.shape[1] - 1) // 2
    for i, k in enumerate(keep):
        yx = np.argwhere(k)
        yx = np.concatenate([yx, np.repeat(yx[:1], q - len(yx), 0)])
        offs[i], vals[i] = yx - c, lib[i][yx[:, 0], yx[:, 1]]
    return offs, vals


class _PairBatch:
    """n independent attempts at growing the two target snakes, advanced together with numpy.

    Each attempt follows reference §2.2 step 3 by the same rules as the scalar `_Canvas` code (which still
    grows the distractors), with its own flat occupancy canvas and its dilation by the margin (for the
    candidate weights); failed attempts are dropped from `ids`. The first attempt that survives is a draw
    from the same distribution as the original's `while not success` loop, only much faster.
    """

    def __init__(self, p: PathfinderParams, margin: int, rng: np.random.Generator, n: int):
        self.p, self.m, self.rng, self.kit = p, margin, rng, _pair_kit(p, margin)
        self.res = p.resolution
        self.H = self.kit.base.shape[0]  # per attempt a flat (H * H) canvas: 1-d gathers are the fastest
        self.occ = np.tile(self.kit.base.ravel(), n)
        self.docc = np.tile(self.kit.dilated[0].ravel(), n)  # occupancy dilated by the margin, for the weights
        shape = (2, n, p.contour_length)
        self.tail, self.head, self.theta = np.zeros(shape + (2,), int), np.zeros(shape + (2,), int), np.zeros(shape)
        self.pivot, self.dir = np.zeros((2, n, 2), int), np.zeros((2, n))
        self.ids = np.arange(n)

    def _pid(self, rel: np.ndarray) -> np.ndarray:
        S = self.kit.S
        return (rel[..., 0] + S) * (2 * S + 1) + rel[..., 1] + S

    def _flat(self, b: np.ndarray, yx: np.ndarray) -> np.ndarray:
        """Flat canvas index of image pixels yx (..., 2) of attempts b (clipped: only ever outside the image)."""
        g = np.clip(yx + self.kit.R, 0, self.H - 1)
        return (b * self.H + g[..., 0]) * self.H + g[..., 1]

    def _inb(self, q: np.ndarray) -> np.ndarray:
        return ((q >= 0) & (q < self.res)).all(-1)

    def _overlap_ok(self, ids, c, pid, others) -> np.ndarray:
        """max(occupancy, other snakes' pending masks) + mask < 1.8 inside the image, for masks centred at c.

        ids (n,), c (n, ..., 2), pid (n, ...); others: list of (pid (n,), centre (n, 2)) of pending masks. Only
        the mask's pixels >= 0.8 are looked at: elsewhere the sum stays below 1 + 0.8.
        """
        k, R = self.kit, self.kit.R
        at = c[..., None, :] + k.hot[0][pid]  # (n, ..., Q, 2) image pixels
        b = ids.reshape((-1,) + (1,) * (at.ndim - 2))
        total = self.occ[self._flat(b, at)]
        for opid, oc in others:
            rel = np.clip(at - oc.reshape(oc.shape[:1] + (1,) * (at.ndim - 2) + (2,)), -R - 1, R + 1) + R + 1
            total = np.maximum(total, k.lib[opid.reshape(b.shape), rel[..., 0], rel[..., 1]])
        total = (total + k.hot[1][pid]) * self._inb(at)
        return total.max(-1) < 1.8

    def _stamp(self, ids, pid, c) -> None:
        """Add the masks pid (n,) centred at c (n, 2) to the attempts' occupancy and its dilation."""
        for grid, offs, vals in ((self.occ, *self.kit.spread), (self.docc, *self.kit.dilated[1:])):
            at = self._flat(ids[:, None], c[:, None, :] + offs[pid])
            grid[at] = np.maximum(grid[at], vals[pid])

    def _record(self, s: int, ids, j: int, tail, head, theta, pivot) -> None:
        self.tail[s, ids, j], self.head[s, ids, j], self.theta[s, ids, j] = tail, head, theta
        self.pivot[s, ids], self.dir[s, ids] = pivot, theta

    def seed(self) -> None:
        """Place both seeds (bounds retries as the original; the second also may not overlap the first)."""
        p, k, rng, ids = self.p, self.kit, self.rng, self.ids
        n, tries, L, m = len(ids), p.max_paddle_retrial + 1, p.paddle_length, self.m
        todo, dead = np.ones(n, bool), np.zeros(n, bool)
        deg, u = rng.integers(-180, 180, (n, tries)), rng.random((n, tries))
        for t in range(tries):
            cnt, theta = k.count[deg[:, t] + 180], np.deg2rad(deg[:, t])
            dead |= todo & (cnt == 0)  # no free tail for this orientation: the attempt fails (as the original)
            todo &= cnt > 0
            pick = k.start[deg[:, t] + 180] + np.minimum((u[:, t] * cnt).astype(int), np.maximum(cnt - 1, 0))
            tail = k.tails[np.minimum(pick, len(k.tails) - 1)]
            head = tail + np.stack(_ceil_offset(L, theta), -1).astype(int)
            pivot = head + np.stack(_ceil_offset(L + m, theta + np.pi), -1).astype(int)
            ok = todo & self._inb(head) & self._inb(pivot)
            self._record(0, ids[ok], 0, tail[ok], head[ok], theta[ok], pivot[ok])
            todo &= ~ok
        keep = ~(dead | todo)
        ids = ids[keep]
        n, todo = len(ids), np.ones(len(ids), bool)
        t0, h0 = self.tail[0, ids, 0], self.head[0, ids, 0]
        first = [(self._pid(h0 - t0), t0)]
        deg, phi = rng.integers(-180, 180, (n, tries)), np.deg2rad(rng.integers(0, 360, (n, tries)))
        for t in range(tries):
            theta = np.deg2rad(deg[:, t])
            tail = np.round(t0 + p.seed_distance * np.stack([np.sin(phi[:, t]), np.cos(phi[:, t])], -1)).astype(int)
            head = tail + np.stack(_ceil_offset(L, theta), -1).astype(int)
            pivot = head + np.stack(_ceil_offset(L + m, theta + np.pi), -1).astype(int)
            ok = todo & self._inb(tail) & self._inb(head) & self._inb(pivot)
            ok[ok] = self._overlap_ok(ids[ok], tail[ok], self._pid(head - tail)[ok], [(a[ok], c[ok]) for a, c in first])
            self._record(1, ids[ok], 0, tail[ok], head[ok], theta[ok], pivot[ok])
            todo &= ~ok
        self.ids = ids[~todo]

    def extend(self, s: int, j: int) -> None:
        """Grow snake s of every live attempt by its paddle j; attempts that hit a dead end are dropped."""
        p, k, ids, m, L = self.p, self.kit, self.ids, self.m, self.p.paddle_length
        if len(ids) == 0:
            return
        theta = self.dir[s, ids]
        pivot = self.pivot[s, ids] + np.stack(_ceil_offset(L + 2 * m, theta), -1).astype(int)
        pts = pivot[:, None, :] + k.offs[None]  # (n, C, 2)
        delta = np.abs((k.dirs[None] - theta[:, None] + np.pi) % (2 * np.pi) - np.pi)
        w = (1 - self.docc[self._flat(ids[:, None], pts)]) * _turn_weight(delta, p.continuity)
        w = w * self._inb(pts)
        tot = w.sum(1)
        live = tot >= 1e-4
        cdf = np.cumsum(w / np.where(live, tot, 1)[:, None], 1)
        u = self.rng.random((len(ids), p.max_paddle_retrial + 1))
        last_pos = w.shape[1] - 1 - (w[:, ::-1] > 0).argmax(1)  # guards u >= cdf[-1] against rounding
        pick = np.minimum((cdf[:, None, :] <= u[..., None]).sum(-1), last_pos[:, None])  # (n, tries)
        far = pivot[:, None, :] + k.offs[pick]
        near = far + k.back[pick]  # the paddle is drawn from the far point back towards the pivot
        o, last = 1 - s, j - 1 + s  # the other snake's newest paddle is not in the occupancy yet; never cross it
        other = (self._pid(self.head[o, ids, last] - self.tail[o, ids, last]), self.tail[o, ids, last])
        fits = self._overlap_ok(ids, near, self._pid(-k.back[pick]), [other]) & live[:, None]
        ok = fits.any(1)
        t = fits.argmax(1)[ok]
        ids_ok, rows = ids[ok], np.arange(len(ids))[ok]
        prev_t, prev_h = self.tail[s, ids_ok, j - 1], self.head[s, ids_ok, j - 1]
        self._stamp(ids_ok, self._pid(prev_h - prev_t), prev_t)  # the one-segment lag: commit the previous paddle
        c = pick[rows, t]
        self._record(s, ids_ok, j, near[rows, t], far[rows, t], k.dirs[c], pivot[ok])
        self.ids = ids_ok


def _target_pair(p: PathfinderParams, rng: np.random.Generator, margin: int) -> tuple[_Canvas, list[_Snake]]:
    """Grow the two target snakes, retrying whole pairs until one succeeds (batches grow 16, 32, ... attempts)."""
    kit, n, res = _pair_kit(p, margin), 16, p.resolution
    cap = int(np.clip(2 ** 22 // (res + 2 * kit.R) ** 2, 32, 2048))  # about 16 MB of float32 occupancy
    while True:
        batch = _PairBatch(p, margin, rng, n)
        batch.seed()
        for j in range(1, p.contour_length):
            for s in (0, 1):
                batch.extend(s, j)
        if len(batch.ids):
            break
        n = min(2 * n, cap)
    b = int(batch.ids[0])
    cv = _Canvas(p, rng, margin)
    cv.occ = batch.occ.reshape(-1, batch.H, batch.H)[b, kit.R:kit.R + res, kit.R:kit.R + res].astype(float)
    contrasts = list(p.snake_contrasts) * 2
    rng.shuffle(contrasts)
    paddle_c = p.paddle_contrasts[int(rng.integers(len(p.paddle_contrasts)))]
    snakes = []
    for s in range(2):
        snake = _Snake(paddle_c * contrasts[s])
        snake.paddles = [Paddle((int(a[0]), int(a[1])), (int(h[0]), int(h[1])), float(t))
                         for a, h, t in zip(batch.tail[s, b], batch.head[s, b], batch.theta[s, b], strict=True)]
        cv.occupy(cv.mask(snake.paddles[-1].tail, snake.paddles[-1].head))  # the last paddles' lag ends here
        snakes.append(snake)
    return cv, snakes
