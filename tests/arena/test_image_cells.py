"""An arena cell with a 2-D mixer trains an image model on the task's pixels (Pathfinder, LRA image from
CIFAR-10 files), beside the 1-D cells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import efformer.arena.runner as runner
from efformer.arena.tasks import build_datasets, get_task
from efformer.data.images import token_images
from efformer.data.loaders import cifar_grayscale
from efformer.results import ResultsStore


def _tiny_pathfinder():
    spec = get_task("pathfinder", "quick")
    return dataclasses.replace(spec, preset="tiny", data=dict(spec.data, n=40),
                               optim=dict(spec.optim, steps=2, batch_size=8, warmup=1))


@pytest.mark.slow  # generates Pathfinder images and trains two cells: ~40 s on a busy 2-core machine
def test_a_2d_mixer_cell_runs_an_image_model_on_pathfinder_pixels(tmp_path):
    spec, store = _tiny_pathfinder(), ResultsStore(tmp_path / "r.db")
    cfg = runner.image_model_config(spec, "swin")
    assert (cfg.image_size, cfg.patch_size, cfg.in_channels) == (32, 1, 1)  # one token per pixel, as 1-D cells
    res = [runner.run_cell(spec, m, 0, store, tmp_path / "runs", tmp_path / "data") for m in ("swin", "softmax")]
    assert [r.status for r in res] == ["done", "done"], [r.error for r in res]
    assert all(0 <= r.accuracy <= 1 for r in res)


def test_a_2d_mixer_on_a_text_task_fails_with_the_reason(tmp_path):
    spec = dataclasses.replace(get_task("listops", "quick"), preset="tiny")
    res = runner.run_cell(spec, "neighborhood", 0, ResultsStore(tmp_path / "r.db"), tmp_path, tmp_path)
    assert res.status == "failed" and "runs only on the image tasks" in res.error


def _write_cifar_bin(root, n_per_batch: int = 8):
    """cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin of 1 label byte + 3072 pixel bytes (R, G, B planes,
    each row-major 32 x 32) per record; record i lights row 3 * label of its red plane, so orientation shows."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n_per_batch)
        pix = rng.integers(0, 40, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        pix[np.arange(n_per_batch), 0, 3 * labels] = 255
        recs = np.concatenate([labels.astype(np.uint8)[:, None], pix.reshape(n_per_batch, -1)], 1)
        (folder / f"{name}.bin").write_bytes(recs.tobytes())
    return pix, labels  # the test batch


def _tiny_image():
    spec = get_task("image", "quick")
    return dataclasses.replace(spec, preset="tiny", optim=dict(spec.optim, steps=2, batch_size=8, warmup=1))


def test_lra_image_reaches_a_2d_cell_as_upright_grey_pictures(tmp_path):
    """The LRA image task's CIFAR-10 files (grey, as the LRA paper) become the (1, 32, 32) images a 2-D cell
    trains on: LRA's grey conversion of each record, rows kept as rows."""
    test_rgb, test_labels = _write_cifar_bin(tmp_path / "data")
    spec = _tiny_image()
    train, val, test = build_datasets(spec, spec.preset, data_dir=tmp_path / "data")
    assert (len(train), len(val), len(test)) == (36, 4, 8)  # 90/10 of the five batches; test_batch
    images = token_images(test, 32).images  # what a 2-D cell trains on: (n, 1, 32, 32) in [0, 1]
    assert images.shape == (8, 1, 32, 32)
    want = cifar_grayscale(test_rgb.reshape(8, 3, 1024)).reshape(8, 32, 32)
    assert torch.equal((images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(want))
    bright = images[:, 0].mean(-1).argmax(-1)  # the lit row of each picture: rows stay rows
    assert torch.equal(bright, torch.as_tensor(3 * test_labels))
    assert runner.image_model_config(spec, "swin").in_channels == 1


@pytest.mark.slow  # trains two 1024-token cells: ~35 s on a busy 2-core machine
def test_lra_image_runs_an_image_model_beside_a_1d_mixer_on_cifar_files(tmp_path):
    _write_cifar_bin(tmp_path / "data")
    spec, store = _tiny_image(), ResultsStore(tmp_path / "r.db")
    res = [runner.run_cell(spec, m, 0, store, tmp_path / "runs", tmp_path / "data") for m in ("swin", "softmax")]
    assert [r.status for r in res] == ["done", "done"], [r.error for r in res]
    assert all(0 <= r.accuracy <= 1 for r in res)


def test_lra_image_without_its_files_is_missing_data_naming_the_layout(tmp_path):
    res = runner.run_cell(_tiny_image(), "swin", 0, ResultsStore(tmp_path / "r.db"), tmp_path / "runs",
                          tmp_path / "empty")
    assert res.status == "missing-data" and "data_batch_1.bin" in res.error
