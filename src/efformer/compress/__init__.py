"""Compression: post-training quantization (RTN, GPTQ, SmoothQuant, OS+, FP8/FP4) with real low-bit linears."""

from efformer.compress import io  # noqa: F401  (registers the config.json "quantization" section)
from efformer.compress.api import (
    FloatConfig,
    GPTQConfig,
    RTNConfig,
    W8A8Config,
    default_filter,
    make_config,
    quantize,
)
from efformer.compress.budget import PruneResult, Target, parse_target, prune
from efformer.compress.calibration import calibration_windows, read_text_ids
from efformer.compress.fuse import fuse
from efformer.compress.prune import PrunePlan, apply_plan
from efformer.compress.qlinear import IntWeightLinear, W8A8Linear

__all__ = [
    "FloatConfig", "GPTQConfig", "IntWeightLinear", "RTNConfig", "W8A8Config", "W8A8Linear", "calibration_windows",
    "default_filter", "make_config", "quantize", "read_text_ids",
    "PrunePlan", "PruneResult", "Target", "apply_plan", "fuse", "parse_target", "prune",  # structured pruning
]
