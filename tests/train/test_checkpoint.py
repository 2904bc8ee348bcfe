"""Checkpoints: no pickle, exact in-process resume, keep-last-k, and damaged checkpoints refused
before any state is touched."""

from __future__ import annotations

import json

import pytest
import torch

from efformer.errors import CheckpointError
from efformer.train.checkpoint import (
    MANIFEST,
    TENSORS,
    flatten_optimizer,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_in_process_is_bit_identical(tiny):
    full, _ = tiny(steps=6, checkpoint_every=3)
    full.fit()
    ref = _weights(full.raw)
    # a second trainer resumes from the step-3 checkpoint and must end where the first one did
    half, _ = tiny(steps=6, checkpoint_every=3)
    assert half.resume(full.ckpt_dir / "step_00000003")
    assert (half.step, half.epoch, half.batch_index) == (3, 0, 3)
    half.fit()
    for k, v in _weights(half.raw).items():
        assert torch.equal(v, ref[k]), k


def test_checkpoint_files_are_safetensors_and_json_only(tiny):
    t, _ = tiny(steps=2, checkpoint_every=0)
    t.fit()
    (ckpt,) = list_checkpoints(t.ckpt_dir)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([TENSORS, MANIFEST])
    tensors, meta = load_checkpoint(ckpt)
    assert meta["step"] == 2 and meta["position"] == {"epoch": 0, "batch_index": 2}
    assert any(k.startswith("optim/") and k.endswith("/exp_avg_sq") for k in tensors)
    assert "rng/torch" in tensors and json.loads((ckpt / MANIFEST).read_text())["format"]


def test_optimizer_state_round_trips_through_flattening():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).square().sum().backward()
    opt.step()
    from efformer.train.distributed import full_optimizer_state

    state = full_optimizer_state(model, opt)
    tensors, meta = flatten_optimizer(state)
    back = unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == state["param_groups"]
    for name, per in state["state"].items():
        for key, v in per.items():
            assert torch.equal(back["state"][name][key], v)


def test_keep_last_prunes_and_ignores_temporary_folders(tmp_path):
    (tmp_path / ".step_00000009.abc.tmp").mkdir()  # what a crash mid-write leaves behind
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"model/w": torch.full((2,), float(step))}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    tensors, meta = load_checkpoint(tmp_path)  # latest
    assert meta["step"] == 4 and tensors["model/w"].tolist() == [4.0, 4.0]


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing", "size"])
def test_damaged_checkpoint_is_refused_and_nothing_is_loaded(tiny, damage):
    t, _ = tiny(steps=2, checkpoint_every=0)
    t.fit()
    (ckpt,) = list_checkpoints(t.ckpt_dir)
    data = (ckpt / TENSORS).read_bytes()
    if damage == "truncate":
        (ckpt / TENSORS).write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        (ckpt / TENSORS).write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    elif damage == "manifest":
        (ckpt / MANIFEST).write_text('{"format": "efformer-train-checkpoint", "ver')
    elif damage == "missing":
        (ckpt / TENSORS).unlink()
    else:
        (ckpt / TENSORS).write_bytes(data + b"\0" * 8)
    fresh, _ = tiny(steps=4)
    before = _weights(fresh.raw)
    with pytest.raises(CheckpointError, match="corrupt|truncated|missing"):
        fresh.resume(ckpt)
    assert fresh.step == 0 and all(torch.equal(v, before[k]) for k, v in _weights(fresh.raw).items())


def test_resume_refuses_a_checkpoint_of_another_model(tiny, tmp_path):
    t, _ = tiny(steps=2, checkpoint_every=0)
    t.fit()
    from efformer.models import create_model
    from efformer.train.trainer import Trainer

    other = create_model("lm-tiny", d_model=32, n_heads=2, n_layers=2, vocab_size=16, max_len=64)
    data = [{"input_ids": torch.arange(1, 9)}] * 8
    tr = Trainer(other, {"steps": 2, "batch_size": 4}, data, out_dir=tmp_path / "other")
    with pytest.raises(CheckpointError, match="different model config"):
        tr.resume(t.ckpt_dir)


def test_no_checkpoint_means_no_resume(tiny):
    t, _ = tiny(steps=2)
    assert t.resume() is False
    with pytest.raises(CheckpointError, match="no checkpoint"):
        t.resume(t.out_dir / "nowhere")
