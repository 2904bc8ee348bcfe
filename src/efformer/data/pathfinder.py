"""Pathfinder generator, from "Learning long-range spatial dependencies with horizontal gated recurrent units"
(Linsley et al., 2018) as configured by "Long Range Arena: A Benchmark for Efficient Transformers" (Tay et al.).

An image holds two target "snakes" (chains of short antialiased line segments, paddles) grown in
lock-step from nearby seeds, short distractor snakes, and two round markers. Label 1: both markers sit
on the two ends of one target snake; label 0: they sit on ends of different snakes. This module
re-implements the algorithm and constants of reference §2.2 with numpy (no scipy/PIL/cv2):

- shapes are rasterised at `aa`x resolution (a hi-res pixel is on if its centre lies within the
  half-width of the segment) on their own small canvas and downsampled with a Lanczos-3 filter, like
  the original's draw_line_n_mask + imresize;
- the hard level is rare by nature: a 14-paddle pair must curl inside the image, and only about 1 in
  3,000 attempts at 64 px (1 in 300 at 128 px) succeeds. The original simply retries whole pairs
  (`while not success` in snakes2.py); `_PairBatch` runs those i.i.d. attempts hundreds at a time with
  numpy and keeps the first success, which samples the same distribution;
- each image is drawn from its own random stream derived from (seed, index), and labels are an exactly
  balanced seeded permutation, so any split of the work across processes gives identical files;
- files follow the released layout: `imgs/<batch>/sample_<i>.png` (8-bit grayscale, min-max scaled to
  0..255 like scipy's imsave) and `metadata/<batch>.npy` (plain-text lines, see `metadata_line`).
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efformer.data.pathfinder_canvas import (
    DIFFICULTIES,
    Paddle,
    PathfinderParams,
    _Canvas,
    _half,
    _patch,
    _Snake,
    params_for,
    render_segment,
)
from efformer.data.pathfinder_pair import _footprint, _free_tails, _target_pair
from efformer.data.png import write_png
from efformer.errors import ConfigError


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
            tails = _free_tails((cv.occ > 0.3) | edge, _footprint(p, cv.half + cv.m, deg))
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
    half = _half(p)
    img = np.zeros((p.resolution, p.resolution))
    for pd in paddles:
        y, x, w = _patch(p.resolution, p.aa, pd.tail, pd.head, half)
        view = img[y:y + w.shape[0], x:x + w.shape[1]]
        np.maximum(view, w * contrast, out=view)
    return img


def sample_image(p: PathfinderParams, label: int, rng: np.random.Generator) -> PathfinderSample:
    """Draw one image with the given label (1: markers on the ends of one snake; 0: on two snakes)."""
    margin = p.margins[int(rng.integers(len(p.margins)))]
    cv, targets = _target_pair(p, rng, margin)
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
    for name, value in (("n", n), ("batch_size", batch_size), ("seed", seed), ("workers", workers)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ConfigError(name, value, "must be an integer")
    if n < 1 or batch_size < 1:
        raise ConfigError("n/batch_size", (n, batch_size), "both must be >= 1")
    if seed < 0:
        raise ConfigError("seed", seed, "must be >= 0")
    p = params_for(resolution, difficulty)
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError("out", str(out), "is a file; give a folder (it is created if missing)")
    root = Path(out) / f"pathfinder{resolution}" / DIFFICULTIES[difficulty][0]
    made = _first_missing(root)
    try:
        _write_all(p, root, n, seed, workers, batch_size, progress, resolution, difficulty)
    except BaseException:  # a failed or interrupted run leaves no half-written folder behind
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return root


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if it all exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _write_all(p: PathfinderParams, root: Path, n: int, seed: int, workers: int, batch_size: int, progress: bool,
               resolution: int, difficulty: str) -> None:
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


__all__ = ["DIFFICULTIES", "Paddle", "PathfinderParams", "PathfinderSample", "balanced_labels", "generate_files",
           "image_rng", "metadata_line", "params_for", "render_segment", "sample_image"]
