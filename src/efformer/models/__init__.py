"""Models built from blocks by name: causal LM, sequence classifier, dual encoder."""

from efformer.models.block_transformer import BlockTransformerLM
from efformer.models.cache import Cache
from efformer.models.classifier import DualEncoderClassifier, SequenceClassifier
from efformer.models.config import ModelConfig, build_config
from efformer.models.elastic import extract
from efformer.models.factory import PRESETS, create_model, list_presets
from efformer.models.io import load, save
from efformer.models.kv_policy import KVPolicy
from efformer.models.lm import CausalLM

__all__ = [
    "PRESETS", "BlockTransformerLM", "Cache", "CausalLM", "DualEncoderClassifier", "KVPolicy", "ModelConfig",
    "SequenceClassifier", "build_config",
    "create_model", "extract", "list_presets", "load", "save",
]
