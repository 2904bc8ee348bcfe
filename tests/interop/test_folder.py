"""Bad Hugging Face folders: each is a CheckpointError naming the file and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from efformer.errors import CheckpointError
from efformer.interop import from_hf
from tests.interop import hf_models as hm


@pytest.fixture
def folder(tmp_path):
    return hm.save(hm.llama(), tmp_path / "hf")


def refused(folder, *needles):
    with pytest.raises(CheckpointError) as e:
        from_hf(folder)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


def test_no_config(folder):
    (folder / "config.json").unlink()
    refused(folder, str(folder / "config.json"), "missing", "save_pretrained")


def test_unknown_model_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llamma"}))
    refused(folder, "config.json", "'llamma'", "llama, mistral")


def test_bin_only(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    refused(folder, "pytorch_model.bin", "safe_serialization=True", "save_file")


def test_not_a_folder(tmp_path):
    refused(tmp_path / "nowhere", "not a folder")


def test_index_names_a_missing_shard(tmp_path):
    folder = hm.save(hm.llama(), tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    refused(folder, "model.safetensors.index.json", shard, "copy every shard")


def test_wrong_tensor_shape(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 32)
    save_file(tensors, folder / "model.safetensors")
    refused(folder, "model.safetensors", "model.layers.1.self_attn.k_proj.weight", "(3, 32)", "matching pair")


def test_missing_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    refused(folder, "model.norm.weight", "restore the complete weights")


def test_extra_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # the config says no bias
    save_file(tensors, folder / "model.safetensors")
    refused(folder, "q_proj.bias", "does not use")


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 1e9])
def test_truncated_shard(folder, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(4, int(len(data) * keep))])
    refused(folder, str(path), "truncated", "copy it again")


def test_config_missing_a_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    refused(folder, "config.json", "'hidden_size'")


def test_unsupported_rope_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (folder / "config.json").write_text(json.dumps(cfg))
    refused(folder, "config.json", "'longrope'", "yarn")
