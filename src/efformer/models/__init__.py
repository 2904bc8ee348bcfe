"""Models built from blocks by name: causal LM, sequence classifier, dual encoder."""

from efformer.models.cache import Cache
from efformer.models.classifier import DualEncoderClassifier, SequenceClassifier
from efformer.models.factory import PRESETS, create_model, list_presets, load, save
from efformer.models.lm import CausalLM

__all__ = [
    "PRESETS", "Cache", "CausalLM", "DualEncoderClassifier", "SequenceClassifier",
    "create_model", "list_presets", "load", "save",
]
