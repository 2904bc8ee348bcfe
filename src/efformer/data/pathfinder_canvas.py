"""Pathfinder geometry: per-resolution constants, antialiased paddle rendering and the occupancy canvas.

Split from `efformer.data.pathfinder` (which documents the algorithm and its sources)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from efformer.errors import ConfigError

DIFFICULTIES = {"easy": ("curv_baseline", 6), "intermediate": ("curv_contour_length_9", 9),
                "hard": ("curv_contour_length_14", 14)}


@dataclass(frozen=True)
class PathfinderParams:
    """Generator constants for one resolution and difficulty (reference §2.2 table)."""

    resolution: int
    padding: int
    aa: int
    paddle_length: int
    paddle_thickness: float
    margins: tuple[int, ...]
    seed_distance: int
    marker_radius: float
    continuity: float
    snake_contrasts: tuple[float, ...]
    paddle_contrasts: tuple[float, ...]
    n_distractors: int
    contour_length: int = 14
    max_paddle_retrial: int = 2
    max_distractor_retrial: int = 4

    @property
    def distractor_length(self) -> int:
        """Paddles per distractor snake: contour_length // 3 (the Python 2 integer division of the original)."""
        return self.contour_length // 3


# num_distractor_snakes is computed once from the hard level (contour 14 -> distractor length 4) and, as in
# the reference wrapper, not recomputed for the other levels: 20//4, 22//4, 35//4, 30//4.
_BASE = {
    32: PathfinderParams(32, 1, 2, 2, 0.5, (1,), 7, 1.5, 1.0, (2.0,), (0.75,), 5),
    64: PathfinderParams(64, 1, 2, 5, 1.0, (1,), 12, 2.5, 1.8, (0.8,), (1.0,), 5),
    128: PathfinderParams(128, 1, 2, 5, 1.5, (2, 3), 20, 3.0, 1.8, (0.9,), (1.0,), 8),
    256: PathfinderParams(256, 22, 2, 5, 2.0, (3,), 27, 5.0, 1.8, (1.0,), (1.0,), 7),
}


def params_for(resolution: int, difficulty: str = "hard") -> PathfinderParams:
    """The LRA constants for a resolution (32, 64, 128, 256) and level (easy, intermediate, hard)."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution not in _BASE:
        raise ConfigError("resolution", resolution, f"one of {sorted(_BASE)}")
    if not isinstance(difficulty, str) or difficulty not in DIFFICULTIES:
        raise ConfigError("difficulty", difficulty, f"one of {list(DIFFICULTIES)}")
    return replace(_BASE[resolution], contour_length=DIFFICULTIES[difficulty][1])


# ---- rasterisation ---------------------------------------------------------------------------------
def _lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


@lru_cache(maxsize=4096)
def _local(dy: int, dx: int, half: float, aa: int, mask: bool = False) -> np.ndarray:
    """(2r+1, 2r+1) antialiased coverage of segment (0,0)->(dy,dx), half_width px thick, centred on its start.

    Like the original's draw_line_n_mask, a shape is drawn on its own small canvas and pasted, so it does
    not depend on where it lands. A hi-res pixel (aa per native px) is on if its centre is within half of the
    segment; Lanczos-3 then brings it to native resolution. r leaves 4 px around the shape (support is 3).
    Occupancy masks (mask=True) are kept in 1/255 steps, as the original's uint8 imresize output was.
    """
    r = int(max(abs(dy), abs(dx)) + math.ceil(half)) + 4
    hi = (np.arange(-(r + 3) * aa, (r + 4) * aa) + 0.5) / aa - 0.5  # hi-res pixel centres, native units
    m = _lanczos3(hi[None, :] - np.arange(-r, r + 1)[:, None])
    m /= m.sum(1, keepdims=True)
    dd = float(dy * dy + dx * dx)
    py, px = hi[:, None], hi[None, :]
    t = np.clip((py * dy + px * dx) / dd, 0, 1) if dd > 0 else 0.0
    cover = ((py - t * dy) ** 2 + (px - t * dx) ** 2 <= half ** 2 + 1e-9).astype(float)
    win = np.clip(m @ cover @ m.T, 0.0, 1.0)
    if mask:
        win = np.round(win * 255) / 255
    win.setflags(write=False)
    return win


def _patch(res: int, aa: int, p0, p1, half: float, mask: bool = False) -> tuple[int, int, np.ndarray]:
    """(y0, x0, window): the coverage of segment p0->p1 (integer (y, x)) clipped to a res x res image."""
    w = _local(int(p1[0] - p0[0]), int(p1[1] - p0[1]), float(half), aa, mask)
    r = w.shape[0] // 2
    y0, x0 = int(p0[0]) - r, int(p0[1]) - r
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + w.shape[0], res), min(x0 + w.shape[1], res)
    if ye <= ys or xe <= xs:
        return 0, 0, np.zeros((0, 0))
    return ys, xs, w[ys - y0:ye - y0, xs - x0:xe - x0]


def render_segment(res: int, aa: int, p0, p1, half_width: float) -> np.ndarray:
    """Antialiased coverage (res, res) in [0, 1] of segment p0->p1 (y, x), half_width px thick (p0 == p1: disc)."""
    out = np.zeros((res, res))
    y0, x0, win = _patch(res, aa, p0, p1, half_width)
    out[y0:y0 + win.shape[0], x0:x0 + win.shape[1]] = win
    return out


@lru_cache(maxsize=16)
def _disc(radius: int) -> np.ndarray:
    """Integer offsets (k, 2) within a disc of the given radius."""
    r = np.arange(-radius, radius + 1)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    keep = yy ** 2 + xx ** 2 <= radius ** 2
    return np.stack([yy[keep], xx[keep]], 1)


def _ceil_offset(dist: float, theta) -> tuple:
    """Integer (dy, dx) = ceil(dist * (sin, cos)); rounding to 1e-9 first drops float noise like sin(pi) != 0."""
    return np.ceil(np.round(dist * np.sin(theta), 9)), np.ceil(np.round(dist * np.cos(theta), 9))


def _step(p, theta: float, dist: float) -> tuple[int, int]:
    """Translate integer point p by dist along theta, rounding up as the original does."""
    dy, dx = _ceil_offset(dist, theta)
    return int(p[0] + dy), int(p[1] + dx)


@lru_cache(maxsize=64)
def _circle(radius: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate offsets (k, 2) on a circle sampled every pixel of arc, their directions (k,), and the offset
    (k, 2) from each candidate back to the near end of a paddle of `length` drawn towards the centre."""
    angles = np.deg2rad(np.arange(0.0, 360.0, 360.0 / (2 * math.pi * radius)))
    offs = np.unique(np.stack([np.round(radius * np.sin(angles)), np.round(radius * np.cos(angles))], 1), axis=0)
    offs = offs.astype(int)
    dirs = np.arctan2(offs[:, 0], offs[:, 1])
    back = np.stack(_ceil_offset(length, dirs + np.pi), 1).astype(int)
    return offs, dirs, back


def _inside(p, res: int) -> bool:
    return 0 <= p[0] < res and 0 <= p[1] < res


def _turn_weight(delta: np.ndarray, continuity: float) -> np.ndarray:
    """The original's preference for going straight: cos(min(delta * continuity, pi/2))^2."""
    return np.maximum(np.cos(np.minimum(delta * continuity, np.pi / 2)), 0) ** 2


def _half(p: PathfinderParams) -> float:
    """Half the drawn paddle width: the original draws round(t * aa) hi-res pixels wide."""
    return max(round(p.paddle_thickness * p.aa), 1) / (2 * p.aa)


@dataclass
class Paddle:
    """One drawn segment, oriented along the growth of its snake: tail -> head, theta (radians)."""

    tail: tuple[int, int]
    head: tuple[int, int]
    theta: float


Patch = tuple[int, int, np.ndarray]


@dataclass
class _Snake:
    contrast: float
    paddles: list[Paddle] = field(default_factory=list)
    last_mask: Patch | None = None  # not yet in the shared occupancy: the one-segment lag
    pivot: tuple[int, int] = (0, 0)
    theta: float = 0.0


class _Canvas:
    """Shared state while drawing one image: the occupancy mask (res, res) in [0, 1] and the constants."""

    def __init__(self, p: PathfinderParams, rng: np.random.Generator, margin: int):
        self.p, self.rng, self.m, self.res = p, rng, margin, p.resolution
        self.half = _half(p)
        self.occ = np.zeros((self.res, self.res))
        pad = p.padding
        self.occ[:pad], self.occ[-pad:], self.occ[:, :pad], self.occ[:, -pad:] = 1, 1, 1, 1

    def mask(self, a, b) -> Patch:
        """Occupancy footprint of segment a-b: the paddle dilated by the margin."""
        return _patch(self.res, self.p.aa, a, b, self.half + self.m, mask=True)

    def occupy(self, patch: Patch) -> None:
        """Add a footprint to the occupancy mask."""
        y, x, w = patch
        view = self.occ[y:y + w.shape[0], x:x + w.shape[1]]
        np.maximum(view, w, out=view)

    def fits(self, patch: Patch) -> bool:
        """The original's overlap test: max(occupancy + footprint) < 1.8."""
        y, x, w = patch
        return w.size == 0 or float((self.occ[y:y + w.shape[0], x:x + w.shape[1]] + w).max()) < 1.8

    def seed(self, snake: _Snake, tail, theta: float) -> bool:
        """Place a snake's first paddle at tail if its head and pivot are inside the image."""
        tail = (int(tail[0]), int(tail[1]))
        head = _step(tail, theta, self.p.paddle_length)
        pivot = _step(head, theta + math.pi, self.p.paddle_length + self.m)
        if not (_inside(head, self.res) and _inside(pivot, self.res)):
            return False
        snake.paddles, snake.last_mask = [Paddle(tail, head, theta)], self.mask(tail, head)
        snake.pivot, snake.theta = pivot, theta
        return True

    def extend(self, snake: _Snake) -> bool:
        """Add one paddle, turning by less than pi/(2*continuity); False at a dead end."""
        p, m = self.p, self.m
        pivot = _step(snake.pivot, snake.theta, p.paddle_length + 2 * m)
        offs, direction, back = _circle(p.paddle_length + m, p.paddle_length)
        pts = offs + np.asarray(pivot)
        keep = ((pts >= 0) & (pts < self.res)).all(1)
        pts, direction, back = pts[keep], direction[keep], back[keep]
        if len(pts) == 0:
            return False
        turn = _turn_weight(np.abs(np.angle(np.exp(1j * (direction - snake.theta)))), p.continuity)
        near = np.clip(pts[:, None, :] + _disc(m)[None], 0, self.res - 1)  # occupancy dilated by a disc of radius m
        w = (1 - self.occ[near[..., 0], near[..., 1]].max(1)) * turn
        if w.sum() < 1e-4:
            return False
        cdf = np.cumsum(w / w.sum())
        for _ in range(p.max_paddle_retrial + 1):
            i = min(int(np.searchsorted(cdf, self.rng.random(), side="right")), len(pts) - 1)
            far = (int(pts[i, 0]), int(pts[i, 1]))
            near_end = (far[0] + int(back[i, 0]), far[1] + int(back[i, 1]))  # drawn back towards the pivot
            mask = self.mask(far, near_end)
            if self.fits(mask):
                self.occupy(snake.last_mask)
                snake.paddles.append(Paddle(near_end, far, float(direction[i])))
                snake.last_mask, snake.pivot, snake.theta = mask, pivot, float(direction[i])
                return True
        return False
