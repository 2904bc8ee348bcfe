"""efformer: every efficient-Transformer mechanism as a tested, drop-in token mixer."""

from efformer.config import ModelConfig, build_config
from efformer.errors import (
    CapabilityError,
    CheckpointError,
    ConfigError,
    DataError,
    EfformerError,
    ShapeError,
    UnknownNameError,
)
from efformer.models import CausalLM, DualEncoderClassifier, SequenceClassifier, create_model, list_presets, load
from efformer.registry import FFNS, MIXERS, NORMS, POSITIONALS, describe_mixer, list_mixers, register_mixer

__version__ = "0.1.0"


def save(model, directory):
    """Save a model as ``config.json`` + ``model.safetensors`` in ``directory``."""
    from efformer.models.factory import save as _save

    return _save(model, directory)


__all__ = [
    "FFNS", "MIXERS", "NORMS", "POSITIONALS", "CapabilityError", "CausalLM", "CheckpointError",
    "ConfigError", "DataError", "DualEncoderClassifier", "EfformerError", "ModelConfig",
    "SequenceClassifier", "ShapeError", "UnknownNameError", "build_config", "create_model",
    "describe_mixer", "list_mixers", "list_presets", "load", "register_mixer", "save",
]
