"""``create_model`` from a preset name or a config, with keyword overrides."""

from __future__ import annotations

from typing import Any

from torch import nn

from efformer.errors import ConfigError, UnknownNameError
from efformer.models.block_transformer import BlockTransformerLM
from efformer.models.classifier import DualEncoderClassifier, SequenceClassifier
from efformer.models.config import ModelConfig, build_config
from efformer.models.lm import CausalLM
from efformer.models.vision import VISION_PRESETS, ImageClassifier, VisionConfig, create_image_model

PRESETS: dict[str, dict[str, Any]] = {
    "lm-tiny": dict(task="lm", vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_len=1024),
    "lm-small": dict(task="lm", vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_len=4096),
    "classifier-tiny": dict(task="classifier", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                            max_len=1024, positional="sinusoidal", norm="layernorm", ffn="gelu"),
    "dual-tiny": dict(task="dual", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_len=1024,
                      positional="sinusoidal", norm="layernorm", ffn="gelu"),
}

MODEL_CLASSES = {"lm": CausalLM, "classifier": SequenceClassifier, "dual": DualEncoderClassifier,
                 "image": ImageClassifier}


def model_class(cfg: ModelConfig | VisionConfig) -> type[nn.Module]:
    """The class that ``cfg`` builds: by task, and a Block Transformer for an LM with ``block_len``."""
    if getattr(cfg, "block_len", None) is not None:
        return BlockTransformerLM
    return MODEL_CLASSES[cfg.task]


def list_presets() -> list[str]:
    """Names of the built-in model presets."""
    return sorted([*PRESETS, *VISION_PRESETS])


def create_model(preset_or_config: str | dict | ModelConfig = "lm-tiny", **overrides: Any) -> nn.Module:
    """Build a model from a preset name, a config dict or a ModelConfig, with keyword overrides."""
    if not isinstance(preset_or_config, str | dict | ModelConfig | VisionConfig):
        raise ConfigError("preset_or_config", preset_or_config,
                          f"a preset name ({', '.join(list_presets())}), a config dict, a ModelConfig or a "
                          "VisionConfig")
    p = preset_or_config
    if isinstance(p, VisionConfig) or (isinstance(p, str) and p in VISION_PRESETS) or (
            isinstance(p, dict) and p.get("task") == "image"):
        return create_image_model(p, **overrides)  # image classifiers (models/vision.py)
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise UnknownNameError("preset", preset_or_config, [*PRESETS, *VISION_PRESETS])
        base: dict | ModelConfig = PRESETS[preset_or_config]
    else:
        base = preset_or_config
    cfg = build_config(base, **overrides)
    return model_class(cfg)(cfg)
