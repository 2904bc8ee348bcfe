"""efformer: every efficient-Transformer mechanism as a tested, drop-in token mixer."""

# The parts register themselves on import: nn (norms, positional schemes, FFNs), then the mixers.
import efformer.compress  # noqa: F401  (efformer.load reads quantized folders)
import efformer.mixers  # noqa: F401
import efformer.nn  # noqa: F401
import efformer.reduce  # noqa: F401  (efformer.load reads folders saved with trainable token reduction)
from efformer.errors import (
    CapabilityError,
    CheckpointError,
    ConfigError,
    DataError,
    EfformerError,
    ShapeError,
    UnknownNameError,
)
from efformer.interop import convert, distill, from_hf, from_pretrained, stream_convert, to_hf
from efformer.models import (
    CausalLM,
    DualEncoderClassifier,
    ModelConfig,
    SequenceClassifier,
    build_config,
    create_model,
    extract,
    list_presets,
    load,
    save,
)
from efformer.registry import FFNS, MIXERS, NORMS, POSITIONALS, describe_mixer, list_mixers, register_mixer
from efformer.version import VERSION

__version__ = VERSION

__all__ = [
    "FFNS", "MIXERS", "NORMS", "POSITIONALS", "CapabilityError", "CausalLM", "CheckpointError",
    "ConfigError", "DataError", "DualEncoderClassifier", "EfformerError", "ModelConfig",
    "SequenceClassifier", "ShapeError", "UnknownNameError", "build_config", "convert", "create_model", "distill",
    "describe_mixer", "extract", "from_hf", "from_pretrained", "list_mixers", "list_presets", "load",
    "register_mixer", "save", "stream_convert", "to_hf",
]
