"""Pathfinder generator: marker placement, path connectivity, label balance, layout, reproducibility."""

import math
import time

import numpy as np
import pytest

from efformer.data.loaders import read_pathfinder
from efformer.data.pathfinder import (
    balanced_labels,
    generate_files,
    image_rng,
    params_for,
    render_segment,
    sample_image,
)
from efformer.data.png import read_png
from efformer.errors import ConfigError


def _seg_dist(a0, a1, b0, b1) -> float:
    """Distance between two segments, by dense sampling (independent of the generator's geometry code)."""
    t = np.linspace(0, 1, 41)[:, None]
    pa = np.asarray(a0) + t * (np.asarray(a1) - np.asarray(a0))
    pb = np.asarray(b0) + t * (np.asarray(b1) - np.asarray(b0))
    return float(np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min())


def _component(paddles, owner, start: int, gap: float) -> set[int]:
    """Paddles reachable from `start`: within a snake across gaps up to `gap` px, between snakes only by touching."""
    seen, todo = {start}, [start]
    while todo:
        i = todo.pop()
        for j, q in enumerate(paddles):
            if j in seen:
                continue
            d = _seg_dist(paddles[i].tail, paddles[i].head, q.tail, q.head)
            if d <= (gap if owner[i] == owner[j] else 0.5):
                seen.add(j)
                todo.append(j)
    return seen


@pytest.mark.parametrize("res,level,n", [(32, "hard", 6), (32, "easy", 6), (64, "easy", 6), (128, "hard", 3)])
def test_markers_connected_iff_positive(res, level, n):
    p = params_for(res, level)
    for i in range(n):
        label = i % 2
        s = sample_image(p, label, image_rng(11, i))
        assert s.label == label and s.image.dtype == np.uint8 and s.image.shape == (res, res)
        assert all(len(t) == p.contour_length for t in s.targets)
        assert all(len(d) == p.distractor_length for d in s.distractors)
        everything = [pd for snake in s.targets + s.distractors for pd in snake]
        owner = [k for k, snake in enumerate(s.targets + s.distractors) for _ in snake]
        # consecutive paddles of a snake are 2 * margin apart, plus up to 3 px from integer rounding
        gap = 2 * s.margin + 3
        ends = {pd.tail: k for k, pd in enumerate(everything)} | {pd.head: k for k, pd in enumerate(everything)}
        a, b = ends[s.markers[0]], ends[s.markers[1]]
        assert owner[a] in (0, 1) and owner[b] in (0, 1)  # markers sit on target snakes
        reach = _component(everything, owner, a, gap)
        assert (b in reach) == (label == 1), f"image {i}: label {label} but markers connected={b in reach}"
        # different snakes never touch, so a negative image has no path between its markers
        for x, pa in enumerate(everything):
            for y, pb in enumerate(everything[x + 1:], x + 1):
                if owner[x] != owner[y]:
                    assert _seg_dist(pa.tail, pa.head, pb.tail, pb.head) >= 0.99
        # the path is really drawn: every target paddle and both markers are bright in the image
        for pd in s.targets[0] + s.targets[1]:
            mid = np.round((np.asarray(pd.tail) + pd.head) / 2).astype(int)
            window = s.image[max(mid[0] - 1, 0):mid[0] + 2, max(mid[1] - 1, 0):mid[1] + 2]
            assert window.max() > 25  # thin diagonal dashes at 32 px are faint
        for mk in s.markers:
            assert s.image[mk] > 100


@pytest.mark.parametrize("res", [64, 128])
def test_hard_target_snakes_follow_the_growth_rules(res):
    """The batched pair sampler keeps every rule of reference §2.2 step 3 (checked from the output geometry)."""
    p = params_for(res, "hard")
    for i in range(2):
        s = sample_image(p, i % 2, image_rng(4, i))
        a, b = s.targets
        t0 = np.asarray(a[0].tail)
        assert np.all(t0 >= 2 * p.seed_distance) and np.all(t0 < res - 2 * p.seed_distance)  # central seed
        assert abs(np.hypot(*(np.asarray(b[0].tail) - t0)) - p.seed_distance) <= 1  # second seed nearby
        for snake in s.targets:
            assert len(snake) == p.contour_length
            for pd in snake:  # every paddle inside the image, off the padding band, L px long (integer rounding)
                for q in (pd.tail, pd.head):
                    assert p.padding <= min(q) and max(q) < res - p.padding
                assert abs(math.dist(pd.tail, pd.head) - p.paddle_length) <= 1.5
            for u, v in zip(snake, snake[1:], strict=False):
                turn = abs((v.theta - u.theta + math.pi) % (2 * math.pi) - math.pi)
                assert turn < math.pi / (2 * p.continuity) + 0.15  # + the angular step of the candidate circle
                assert abs(math.dist(u.head, v.tail) - 2 * s.margin) <= 3  # consecutive paddles 2m apart
        assert min(_seg_dist(u.tail, u.head, v.tail, v.head) for u in a for v in b) >= 1  # the targets never touch


def test_hard_64_generates_quickly_and_reproducibly(tmp_path):
    """64 px hard used to find no target pair at all; two images must now take seconds, identically in parallel."""
    start = time.perf_counter()
    r1 = generate_files(tmp_path / "a", 64, "hard", n=2, seed=3, batch_size=1, workers=1)
    assert time.perf_counter() - start < 30
    r2 = generate_files(tmp_path / "b", 64, "hard", n=2, seed=3, batch_size=1, workers=2)
    files = sorted(p.relative_to(r1) for p in r1.rglob("*") if p.is_file())
    assert len(files) == 4 and files == sorted(p.relative_to(r2) for p in r2.rglob("*") if p.is_file())
    for f in files:
        assert (r1 / f).read_bytes() == (r2 / f).read_bytes()
    assert read_png(r1 / "imgs" / "0" / "sample_0.png").shape == (64, 64)


def test_labels_balanced_and_seeded():
    lab = balanced_labels(1000, seed=0)
    assert lab.sum() == 500 and not np.array_equal(lab, balanced_labels(1000, seed=1))
    assert balanced_labels(7, seed=0).sum() == 3


def test_render_segment_is_antialiased_and_conserves_area():
    img = render_segment(32, 2, (16, 16), (16, 16), 3.0)  # a disc of radius 3: area ~ 28.3 px
    assert abs(img.sum() - np.pi * 9) < 2.5 and 0 < img[16, 19] < 1 and img[16, 16] == 1
    line = render_segment(32, 2, (5, 5), (5, 25), 1.0)  # 20 x 2 px plus round caps
    assert abs(line.sum() - (40 + np.pi)) < 3


def test_files_layout_reproducible_and_readable(tmp_path):
    r1 = generate_files(tmp_path / "a", 32, "easy", n=10, seed=5, batch_size=4, workers=1)
    r2 = generate_files(tmp_path / "b", 32, "easy", n=10, seed=5, batch_size=4, workers=2)
    assert r1.relative_to(tmp_path / "a").as_posix() == "pathfinder32/curv_baseline"
    files1 = sorted(p.relative_to(r1) for p in r1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(r2) for p in r2.rglob("*") if p.is_file())
    assert files1 == files2 and len(files1) == 10 + 3
    for f in files1:
        assert (r1 / f).read_bytes() == (r2 / f).read_bytes()
    lines = (r1 / "metadata" / "1.npy").read_text().splitlines()
    assert lines[0].split() == ["imgs/1", "sample_0.png", "0", lines[0].split()[3], "1.0", "6", "2", "2", "0.5",
                                "1", "1"]
    ds, empty = read_pathfinder(r1)
    assert len(ds) == 10 and empty == 0 and int(ds.labels.sum()) == 5
    first = read_png(r1 / "imgs" / "0" / "sample_0.png")
    assert np.array_equal(ds[0]["input_ids"].numpy(), first.reshape(-1)) and first.max() == 255


def test_bad_options():
    with pytest.raises(ConfigError, match="resolution"):
        params_for(48)
    with pytest.raises(ConfigError, match="difficulty"):
        params_for(32, "medium")
