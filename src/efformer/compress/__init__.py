"""Compression: post-training quantization (RTN, GPTQ, SmoothQuant, OS+, FP8/FP4) with real low-bit linears;
low-rank factorization (SVD, activation-aware SVD, DSFormer), sparsity masks and LoRA adapters."""

# lowrank before io: its config.json section must be applied before "quantization" (which may name its factors)
from efformer.compress import lowrank  # noqa: F401, I001  (registers the "factorization" section)
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
from efformer.compress.lora import (
    LoRALinear,
    add_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapters,
    unmerge_lora,
)
from efformer.compress.lowrank import DenseSparseLinear, FactorizeConfig, LowRankLinear, factorize
from efformer.compress.qlinear import IntWeightLinear, W8A8Linear
from efformer.compress.sparsity import SparsityConfig, calibrate_activation_sparsity, sparsify

__all__ = [
    "DenseSparseLinear", "FactorizeConfig", "FloatConfig", "GPTQConfig", "IntWeightLinear", "LoRALinear",
    "LowRankLinear", "RTNConfig", "SparsityConfig", "W8A8Config", "W8A8Linear", "add_lora",
    "calibrate_activation_sparsity", "calibration_windows", "default_filter", "factorize", "load_adapters",
    "lora_state_dict", "make_config", "merge_lora", "quantize", "read_text_ids", "remove_lora", "save_adapters",
    "sparsify", "unmerge_lora",
    "PrunePlan", "PruneResult", "Target", "apply_plan", "fuse", "parse_target", "prune",  # structured pruning
]
