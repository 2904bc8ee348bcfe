"""An arena cell with a 2-D mixer trains an image model on the task's pixels, beside the 1-D cells."""

from __future__ import annotations

import dataclasses

import pytest

import efformer.arena.runner as runner
from efformer.arena.tasks import get_task
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
