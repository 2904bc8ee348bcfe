"""``save``/``load``: a model folder is ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from efformer.errors import CheckpointError
from efformer.models.config import ModelConfig, build_config
from efformer.models.factory import MODEL_CLASSES

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(model.cfg.to_json()))
    return out


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save`; refuses missing, truncated or mismatched files."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p} is missing; a saved model is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = ModelConfig.from_json(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    model = MODEL_CLASSES[cfg.task](build_config(cfg))
    try:
        tensors = load_file(str(w_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} is truncated or corrupt ({e}); re-save the model") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{w_path} does not match {cfg_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{w_path}: tensor {k!r} has shape {tuple(v.shape)} but the config needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(map_location)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
