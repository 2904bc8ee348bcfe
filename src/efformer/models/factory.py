"""``create_model`` from a preset or config, and ``save``/``load`` as config.json + model.safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from efformer.config import ModelConfig, build_config
from efformer.errors import CheckpointError, UnknownNameError
from efformer.models.classifier import DualEncoderClassifier, SequenceClassifier
from efformer.models.lm import CausalLM

PRESETS: dict[str, dict[str, Any]] = {
    "lm-tiny": dict(task="lm", vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_len=1024),
    "lm-small": dict(task="lm", vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_len=4096),
    "classifier-tiny": dict(task="classifier", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                            max_len=1024, positional="sinusoidal", norm="layernorm", ffn="gelu"),
    "dual-tiny": dict(task="dual", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_len=1024,
                      positional="sinusoidal", norm="layernorm", ffn="gelu"),
}

MODEL_CLASSES = {"lm": CausalLM, "classifier": SequenceClassifier, "dual": DualEncoderClassifier}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def list_presets() -> list[str]:
    """Names of the built-in model presets."""
    return sorted(PRESETS)


def create_model(preset_or_config: str | dict | ModelConfig = "lm-tiny", **overrides: Any) -> nn.Module:
    """Build a model from a preset name, a config dict or a ModelConfig, with keyword overrides."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise UnknownNameError("preset", preset_or_config, PRESETS)
        base: dict | ModelConfig = PRESETS[preset_or_config]
    else:
        base = preset_or_config
    cfg = build_config(base, **overrides)
    return MODEL_CLASSES[cfg.task](cfg)


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
