"""Calibration windows and observers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from efformer.compress.calibration import (
    HessianObserver,
    RangeObserver,
    calibration_windows,
    observe,
    read_text_ids,
)
from efformer.errors import DataError


def test_hessian_observer_is_the_running_mean_over_batches():
    x = torch.randn(100, 7)
    obs = HessianObserver()
    for chunk in x.split(13):
        obs(chunk)
    assert torch.allclose(obs.h, 2 * x.double().T @ x.double() / 100)


def test_range_observer():
    x = torch.randn(50, 4)
    obs = RangeObserver()
    obs(x[:20])
    obs(x[20:])
    assert torch.equal(obs.lo, x.amin(0)) and torch.equal(obs.absmax, x.abs().amax(0))


def test_windows_are_deterministic_slices(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world, " * 20)
    ids = read_text_ids([f])
    w = calibration_windows(ids, 16, 5, seed=3)
    assert w.shape == (5, 16) and torch.equal(w, calibration_windows(ids, 16, 5, seed=3))
    s = bytes(w[0].tolist()).decode()
    assert s in f.read_text()


def test_short_or_missing_text_is_refused(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(read_text_ids([tmp_path / "e.txt"]), 8, 1)
    with pytest.raises(DataError, match="does not exist"):
        read_text_ids([tmp_path / "missing.txt"])


def test_observe_sees_each_module_input_and_stop_after_skips_later_layers():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3))
    calls = []
    net[2].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(6, 4)
    obs = observe(net, x, {"1": net[1]}, RangeObserver, batch_size=2, stop_after=net[1])
    assert torch.allclose(obs["1"].hi, net[0](x).amax(0).detach())
    assert calls == []
