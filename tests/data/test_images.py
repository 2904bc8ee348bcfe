"""Image datasets: arrays without pickles, PNG folders, pixel tokens as images, bundled digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efformer.data.images import ImageDataset, digits, read_image_arrays, read_image_folder, token_images
from efformer.data.loaders import TokenDataset
from efformer.data.png import write_png
from efformer.errors import DataError
from efformer.train.data import collate


def test_layouts_and_dtypes_become_float_nchw_in_unit_range():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    ds = ImageDataset(u8, [0, 1, 2, 1, 0])
    assert ds.images.shape == (5, 3, 6, 7) and ds.images.dtype == torch.float32
    assert torch.allclose(ds[2]["images"][1], torch.from_numpy(u8[2, :, :, 1]).float() / 255)
    assert ImageDataset(np.zeros((2, 4, 4), np.float32), [0, 1]).images.shape == (2, 1, 4, 4)
    assert ds.n_classes == 3


@pytest.mark.parametrize(("images", "labels", "words"), [
    (np.zeros((2, 4, 4)), [0], "labels must be N=2"),
    (np.zeros((2, 4, 4)), [0.5, 1.0], "labels must be N=2 integers"),
    (np.full((2, 4, 4), 3.0), [0, 1], "must lie in \\[0, 1\\]"),
    (np.zeros((4,)), [0, 1, 2, 3], "images must be"),
    (np.zeros((2, 4, 4)), [0, -1], "negative"),
])
def test_bad_arrays_are_refused(images, labels, words):
    with pytest.raises(DataError, match=words):
        ImageDataset(images, labels)


def test_npz_and_npy_pairs_load_and_pickles_are_refused(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([0, 1, 0, 1]))
    ds = read_image_arrays(tmp_path / "d.npz")
    assert len(ds) == 4 and torch.equal(ds.labels, torch.tensor([0, 1, 0, 1]))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x_labels.npy", np.array([1, 1, 0, 0]))
    assert read_image_arrays(tmp_path / "x.npy").labels.tolist() == [1, 1, 0, 0]
    np.save(tmp_path / "p.npy", np.array([{"a": 1}] * 2, dtype=object), allow_pickle=True)
    np.save(tmp_path / "p_labels.npy", np.array([0, 1]))
    with pytest.raises(DataError, match="without pickles"):
        read_image_arrays(tmp_path / "p.npy")
    with pytest.raises(DataError, match="missing"):
        read_image_arrays(tmp_path / "d.npz", images_key="pixels")
    with pytest.raises(DataError, match="no such file"):
        read_image_arrays(tmp_path / "nope.npz")


def test_png_folder_labels_classes_in_sorted_order(tmp_path):
    rng = np.random.default_rng(2)
    for cls, n in (("cat", 2), ("ant", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (6, 5), dtype=np.uint8))
    ds, classes = read_image_folder(tmp_path)
    assert classes == ["ant", "cat"] and ds.labels.tolist() == [0, 1, 1] and ds.images.shape == (3, 1, 6, 5)
    write_png(tmp_path / "cat" / "big.png", np.zeros((7, 5), np.uint8))
    with pytest.raises(DataError, match="differs from the first image"):
        read_image_folder(tmp_path)


def test_pixel_tokens_become_images_row_major():
    seqs = [np.arange(12, dtype=np.int64), np.arange(12, dtype=np.int64)[::-1].copy()]
    ds = token_images(TokenDataset(seqs, [0, 1]), 3, 4)
    assert ds.images.shape == (2, 1, 3, 4) and ds.images[0, 0, 1, 2] == pytest.approx(6 / 255)
    with pytest.raises(DataError, match="3x5=15 tokens"):
        token_images(TokenDataset(seqs, [0, 1]), 3, 5)


def test_digits_are_the_bundled_images_and_batch_for_the_trainer():
    ds = digits(32)
    assert len(ds) == 1797 and ds.images.shape[1:] == (1, 32, 32) and ds.n_classes == 10
    assert 0 <= float(ds.images.min()) and float(ds.images.max()) <= 1
    assert torch.equal(digits(8).resized(32).images, ds.images)  # integer upscale: nearest
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 1, 32, 32) and batch["label"].shape == (3,)
    a, b = ds.split(0.8, seed=0)
    assert len(a) + len(b) == len(ds) and len(a) == round(0.8 * len(ds))
