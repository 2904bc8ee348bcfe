"""Pathfinder generator, from "Learning long-range spatial dependencies with horizontal gated recurrent units"
(Linsley et al., 2018) as configured by "Long Range Arena: A Benchmark for Efficient Transformers" (Tay et al.).

An image holds two target "snakes" (chains of short antialiased line segments, paddles) grown in
lock-step from nearby seeds, short distractor snakes, and two round markers. Label 1: both markers sit
on the two ends of one target snake; label 0: they sit on ends of different snakes. This module
re-implements the algorithm and constants of reference §2.2 with numpy (no scipy/PIL/cv2):

- shapes are rasterised at `aa`x resolution (a hi-res pixel is on if its centre lies within the
  half-width of the segment) and downsampled with a Lanczos-3 filter, like the original's imresize;
- each image is drawn from its own random stream derived from (seed, index), and labels are an exactly
  balanced seeded permutation, so any split of the work across processes gives identical files;
- files follow the released layout: `imgs/<batch>/sample_<i>.png` (8-bit grayscale, min-max scaled to
  0..255 like scipy's imsave) and `metadata/<batch>.npy` (plain-text lines, see `metadata_line`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from efformer.data.png import write_png
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
    if resolution not in _BASE:
        raise ConfigError("resolution", resolution, f"one of {sorted(_BASE)}")
    if difficulty not in DIFFICULTIES:
        raise ConfigError("difficulty", difficulty, f"one of {list(DIFFICULTIES)}")
    return replace(_BASE[resolution], contour_length=DIFFICULTIES[difficulty][1])


# ---- rasterisation ---------------------------------------------------------------------------------
def _lanczos3(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


@lru_cache(maxsize=8)
def _downsample_matrix(res: int, aa: int) -> np.ndarray:
    """(res, res*aa) Lanczos-3 weights; hi-res pixel J has its centre at (J + 0.5)/aa - 0.5 native px."""
    centres = (np.arange(res * aa) + 0.5) / aa - 0.5
    w = _lanczos3(centres[None, :] - np.arange(res)[:, None])
    return w / w.sum(1, keepdims=True)


@lru_cache(maxsize=1 << 16)
def _patch(res: int, aa: int, p0: tuple, p1: tuple, half_width: float) -> tuple[int, int, np.ndarray]:
    """(y0, x0, window) of the antialiased coverage of segment p0->p1 (y, x) thickened by half_width px.

    A hi-res pixel is on if its centre is within half_width of the segment; the window extends 4 px
    beyond the shape, more than the 3 px Lanczos support, so it equals the full-image result there.
    Cached: snakes are made of integer-ended segments that recur across draws.
    """
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    lo = np.floor(np.minimum(a, b) - half_width).astype(int) - 4
    hi = np.ceil(np.maximum(a, b) + half_width).astype(int) + 5
    (y0, x0), (y1, x1) = np.clip(lo, 0, res), np.clip(hi, 0, res)
    if y1 <= y0 or x1 <= x0:
        return 0, 0, np.zeros((0, 0))
    ys = (np.arange(y0 * aa, y1 * aa) + 0.5) / aa - 0.5
    xs = (np.arange(x0 * aa, x1 * aa) + 0.5) / aa - 0.5
    d = b - a
    dd = float(d @ d)
    py, px = ys[:, None] - a[0], xs[None, :] - a[1]
    t = np.clip((py * d[0] + px * d[1]) / dd, 0, 1) if dd > 0 else 0.0
    cover = ((py - t * d[0]) ** 2 + (px - t * d[1]) ** 2 <= half_width ** 2 + 1e-9).astype(float)
    m = _downsample_matrix(res, aa)
    win = np.clip(m[y0:y1, y0 * aa:y1 * aa] @ cover @ m[x0:x1, x0 * aa:x1 * aa].T, 0.0, 1.0)
    win.setflags(write=False)
    return int(y0), int(x0), win


def render_segment(res: int, aa: int, p0, p1, half_width: float) -> np.ndarray:
    """Antialiased coverage (res, res) in [0, 1] of segment p0->p1 (y, x), half_width px thick (p0 == p1: disc)."""
    out = np.zeros((res, res))
    y0, x0, win = _patch(res, aa, tuple(p0), tuple(p1), float(half_width))
    out[y0:y0 + win.shape[0], x0:x0 + win.shape[1]] = win
    return out


@lru_cache(maxsize=16)
def _disc(radius: int) -> np.ndarray:
    """Integer offsets (k, 2) within a disc of the given radius."""
    r = np.arange(-radius, radius + 1)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    keep = yy ** 2 + xx ** 2 <= radius ** 2
    return np.stack([yy[keep], xx[keep]], 1)


@lru_cache(maxsize=64)
def _circle(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (k, 2) on a circle sampled every pixel of arc, and their directions (k,)."""
    angles = np.deg2rad(np.arange(0.0, 360.0, 360.0 / (2 * math.pi * radius)))
    offs = np.unique(np.stack([np.round(radius * np.sin(angles)), np.round(radius * np.cos(angles))], 1), axis=0)
    offs = offs.astype(int)
    return offs, np.arctan2(offs[:, 0], offs[:, 1])


def _step(p, theta: float, dist: float) -> tuple[int, int]:
    """Translate integer point p by dist along theta, rounding up as the original does."""
    return int(math.ceil(p[0] + dist * math.sin(theta))), int(math.ceil(p[1] + dist * math.cos(theta)))


def _inside(p, res: int) -> bool:
    return 0 <= p[0] < res and 0 <= p[1] < res


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
        self.half = max(round(p.paddle_thickness * p.aa), 1) / (2 * p.aa)  # drawn width round(t * aa) hi-res px
        self.occ = np.zeros((self.res, self.res))
        pad = p.padding
        self.occ[:pad], self.occ[-pad:], self.occ[:, :pad], self.occ[:, -pad:] = 1, 1, 1, 1

    def mask(self, a, b) -> Patch:
        """Occupancy footprint of segment a-b: the paddle dilated by the margin."""
        return _patch(self.res, self.p.aa, tuple(a), tuple(b), self.half + self.m)

    def occupy(self, patch: Patch) -> None:
        """Add a footprint to the occupancy mask."""
        y, x, w = patch
        view = self.occ[y:y + w.shape[0], x:x + w.shape[1]]
        np.maximum(view, w, out=view)

    def fits(self, patch: Patch, others: tuple[Patch, ...] = ()) -> bool:
        """The original's overlap test, max(occupancy + footprint) < 1.8, also against `others`.

        `others` are the not-yet-occupied last paddles of the other snakes growing at the same time: the
        one-segment lag is meant for a snake's own joints and must not let another snake cross it.
        """
        y, x, w = patch
        if w.size == 0:
            return True
        occ = self.occ[y:y + w.shape[0], x:x + w.shape[1]].copy()
        for oy, ox, ow in others:
            ys, xs = slice(max(y, oy), min(y + w.shape[0], oy + ow.shape[0])), slice(max(x, ox),
                                                                                  min(x + w.shape[1], ox + ow.shape[1]))
            if ys.start < ys.stop and xs.start < xs.stop:
                view = occ[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
                np.maximum(view, ow[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox], out=view)
        return float((occ + w).max()) < 1.8

    def free_tails(self, forbidden: np.ndarray, theta_deg: int) -> np.ndarray:
        """(k, 2) pixels from which a paddle at theta (with its margin) touches no forbidden pixel."""
        offs, r = _footprint(self.p, self.half + self.m, theta_deg)
        big = np.ones((self.res + 2 * r, self.res + 2 * r), bool)
        big[r:-r, r:-r] = forbidden
        ok = np.ones((self.res, self.res), bool)
        for dy, dx in offs:
            ok &= ~big[r + dy:r + dy + self.res, r + dx:r + dx + self.res]
        return np.argwhere(ok)

    def seed(self, snake: _Snake, tail, theta: float, others: tuple[Patch, ...] = ()) -> bool:
        """Place a snake's first paddle at tail if its head and pivot are inside the image (and it fits)."""
        tail = (int(tail[0]), int(tail[1]))
        head = _step(tail, theta, self.p.paddle_length)
        pivot = _step(head, theta + math.pi, self.p.paddle_length + self.m)
        if not (_inside(head, self.res) and _inside(pivot, self.res)):
            return False
        if others and not self.fits(self.mask(tail, head), others):
            return False
        snake.paddles, snake.last_mask = [Paddle(tail, head, theta)], self.mask(tail, head)
        snake.pivot, snake.theta = pivot, theta
        return True

    def extend(self, snake: _Snake, others: tuple[Patch, ...] = ()) -> bool:
        """Add one paddle, turning by less than pi/(2*continuity); False at a dead end."""
        p, m = self.p, self.m
        pivot = _step(snake.pivot, snake.theta, p.paddle_length + 2 * m)
        offs, direction = _circle(p.paddle_length + m)
        pts = offs + np.asarray(pivot)
        keep = ((pts >= 0) & (pts < self.res)).all(1)
        pts, direction = pts[keep], direction[keep]
        if len(pts) == 0:
            return False
        delta = np.abs(np.angle(np.exp(1j * (direction - snake.theta))))
        turn = np.maximum(np.cos(np.minimum(delta * p.continuity, np.pi / 2)), 0) ** 2
        # occupancy dilated by a disc of radius m, read at the candidates only
        near = pts[:, None, :] + _disc(m)[None]
        near = np.clip(near, 0, self.res - 1)
        w = (1 - self.occ[near[..., 0], near[..., 1]].max(1)) * turn
        if w.sum() < 1e-4:
            return False
        cdf = np.cumsum(w / w.sum())
        for _ in range(p.max_paddle_retrial + 1):
            i = min(int(np.searchsorted(cdf, self.rng.random(), side="right")), len(pts) - 1)
            far = (int(pts[i, 0]), int(pts[i, 1]))
            near = _step(far, float(direction[i]) + math.pi, p.paddle_length)  # drawn back towards the pivot
            mask = self.mask(far, near)
            if self.fits(mask, others):
                self.occupy(snake.last_mask)
                snake.paddles.append(Paddle(near, far, float(direction[i])))
                snake.last_mask, snake.pivot, snake.theta = mask, pivot, float(direction[i])
                return True
        return False


@lru_cache(maxsize=4096)
def _footprint(p: PathfinderParams, half: float, theta_deg: int) -> tuple[np.ndarray, int]:
    r = p.paddle_length + int(math.ceil(half)) + 4
    c = (r, r)
    foot = render_segment(2 * r + 1, p.aa, c, _step(c, math.radians(theta_deg), p.paddle_length), half)
    return np.argwhere(foot > 0.3) - r, r


def _target_pair(p: PathfinderParams, rng: np.random.Generator, margin: int) -> tuple[_Canvas, list[_Snake]] | None:
    cv = _Canvas(p, rng, margin)
    contrasts = list(p.snake_contrasts) * 2
    rng.shuffle(contrasts)
    paddle_c = p.paddle_contrasts[int(rng.integers(len(p.paddle_contrasts)))]
    snakes = [_Snake(paddle_c * contrasts[0]), _Snake(paddle_c * contrasts[1])]
    band = cv.occ > 0.3
    sd2 = 2 * p.seed_distance  # the first seed keeps 2 * seed_distance from the border
    band[:sd2], band[-sd2:], band[:, :sd2], band[:, -sd2:] = True, True, True, True
    for _ in range(p.max_paddle_retrial + 1):
        deg = int(rng.integers(-180, 180))
        tails = cv.free_tails(band, deg)
        if len(tails) == 0:
            return None
        if cv.seed(snakes[0], tails[int(rng.integers(len(tails)))], math.radians(deg)):
            break
    else:
        return None
    t0 = snakes[0].paddles[0].tail
    for _ in range(p.max_paddle_retrial + 1):  # second seed: seed_distance away from the first tail
        theta = math.radians(int(rng.integers(-180, 180)))
        phi = math.radians(int(rng.integers(0, 360)))
        tail = (round(t0[0] + p.seed_distance * math.sin(phi)), round(t0[1] + p.seed_distance * math.cos(phi)))
        if _inside(tail, cv.res) and cv.seed(snakes[1], tail, theta, (snakes[0].last_mask,)):
            break
    else:
        return None
    for _ in range(p.contour_length - 1):  # lock-step growth; any failure regenerates the pair
        for k, s in enumerate(snakes):
            if not cv.extend(s, (snakes[1 - k].last_mask,)):
                return None
    for s in snakes:
        cv.occupy(s.last_mask)
    return cv, snakes


def _distractors(cv: _Canvas, p: PathfinderParams) -> list[_Snake]:
    out = []
    edge = np.ones((cv.res, cv.res), bool)
    edge[1:-1, 1:-1] = False
    for _ in range(p.n_distractors):
        if (cv.occ < 0.3).mean() < 0.01:  # less than 1% of the image is free
            break
        for _ in range(p.max_distractor_retrial + 1):
            saved = cv.occ.copy()
            snake = _Snake(p.snake_contrasts[int(cv.rng.integers(len(p.snake_contrasts)))])
            deg = int(cv.rng.integers(-180, 180))
            tails = cv.free_tails((cv.occ > 0.3) | edge, deg)
            ok = len(tails) > 0 and cv.seed(snake, tails[int(cv.rng.integers(len(tails)))], math.radians(deg))
            ok = ok and all(cv.extend(snake) for _ in range(p.distractor_length - 1))
            if ok:
                cv.occupy(snake.last_mask)
                out.append(snake)
                break
            cv.occ = saved  # a failed snake leaves nothing behind
    return out


@dataclass
class PathfinderSample:
    """One generated image with the geometry that made it (used by tests and for debugging)."""

    image: np.ndarray  # (res, res) uint8
    label: int
    margin: int
    targets: list[list[Paddle]]  # the two target snakes, paddles in growth order
    distractors: list[list[Paddle]]
    markers: list[tuple[int, int]]  # two marker centres (y, x)
    origin_idx: int


def draw_snake(p: PathfinderParams, paddles: list[Paddle], contrast: float) -> np.ndarray:
    """(res, res) float image of a snake's paddles at the given intensity."""
    half = max(round(p.paddle_thickness * p.aa), 1) / (2 * p.aa)
    img = np.zeros((p.resolution, p.resolution))
    for pd in paddles:
        y, x, w = _patch(p.resolution, p.aa, pd.tail, pd.head, half)
        view = img[y:y + w.shape[0], x:x + w.shape[1]]
        np.maximum(view, w * contrast, out=view)
    return img


def sample_image(p: PathfinderParams, label: int, rng: np.random.Generator) -> PathfinderSample:
    """Draw one image with the given label (1: markers on the ends of one snake; 0: on two snakes)."""
    margin = p.margins[int(rng.integers(len(p.margins)))]
    pair = None
    while pair is None:
        pair = _target_pair(p, rng, margin)
    cv, targets = pair
    distractors = _distractors(cv, p)
    origin_idx = int(rng.integers(2))
    other = origin_idx if label == 1 else 1 - origin_idx
    markers = [targets[origin_idx].paddles[0].tail, targets[other].paddles[-1].head]
    image = np.zeros((p.resolution, p.resolution))
    for s in targets + distractors:
        image = np.maximum(image, draw_snake(p, s.paddles, s.contrast))
    for mk in markers:
        image = np.maximum(image, render_segment(p.resolution, p.aa, mk, mk, p.marker_radius))
    top = image.max()  # min-max scaling to 0..255 as scipy.misc.imsave did (the min is 0: the border is empty)
    u8 = np.round(image / top * 255).astype(np.uint8)
    return PathfinderSample(u8, label, margin, [s.paddles for s in targets], [s.paddles for s in distractors],
                            [tuple(int(v) for v in mk) for mk in markers], origin_idx)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image `index` of a run with `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def balanced_labels(n: int, seed: int) -> np.ndarray:
    """n labels, half 1 and half 0 (one extra 0 when n is odd), in a seeded random order."""
    return np.random.default_rng(np.random.SeedSequence([seed, 1 << 30])).permutation(np.arange(n) % 2)


def metadata_line(subpath: str, filename: str, index: int, label: int, p: PathfinderParams, margin: int) -> str:
    """One released metadata line: subpath filename index label continuity contour distractor L t margin n."""
    fields = [subpath, filename, index, label, p.continuity, p.contour_length, p.distractor_length,
              p.paddle_length, p.paddle_thickness, margin, len(p.paddle_contrasts)]
    return " ".join(str(f) for f in fields)


def _write_batch(args: tuple[PathfinderParams, Path, int, int, int, list[int], int]) -> int:
    p, root, batch, start, stop, labels, seed = args
    img_dir = root / "imgs" / str(batch)
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, i in enumerate(range(start, stop)):
        s = sample_image(p, labels[k], image_rng(seed, i))
        name = f"sample_{i - start}.png"
        write_png(img_dir / name, s.image)
        lines.append(metadata_line(f"imgs/{batch}", name, i - start, s.label, p, s.margin))
    meta = root / "metadata" / f"{batch}.npy"
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, meta)
    return stop - start


def generate_files(out: str | Path, resolution: int = 32, difficulty: str = "hard", n: int = 1000, seed: int = 0,
                   workers: int = 1, batch_size: int = 1000, progress: bool = False) -> Path:
    """Write n images in the released layout under out/pathfinder{R}/{level}/; returns that folder."""
    if n < 1 or batch_size < 1:
        raise ConfigError("n/batch_size", (n, batch_size), "both must be >= 1")
    p = params_for(resolution, difficulty)
    root = Path(out) / f"pathfinder{resolution}" / DIFFICULTIES[difficulty][0]
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    labels = balanced_labels(n, seed).tolist()
    jobs = [(p, root, b, s, min(s + batch_size, n), labels[s:s + batch_size], seed)
            for b, s in enumerate(range(0, n, batch_size))]
    from tqdm import tqdm

    with tqdm(total=n, unit="img", desc=f"pathfinder{resolution}-{difficulty}", disable=not progress) as bar:
        if workers <= 1 or len(jobs) == 1:
            for j in jobs:
                bar.update(_write_batch(j))
        else:
            import multiprocessing as mp

            with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers) as pool:
                for done in pool.imap_unordered(_write_batch, jobs):
                    bar.update(done)
    return root


__all__ = ["DIFFICULTIES", "Paddle", "PathfinderParams", "PathfinderSample", "balanced_labels", "generate_files",
           "image_rng", "metadata_line", "params_for", "render_segment", "sample_image"]
