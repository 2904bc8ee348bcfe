"""Saving and loading quantized models through ``efformer.save`` / ``efformer.load``.

A quantized model's folder is an ordinary efformer model folder: ``model.safetensors`` holds the
packed integer codes, scales and zero points as plain tensors (no pickle, no tensor subclasses), and
``config.json`` gains a ``quantization`` section: the method, its config and, for every replaced
linear, the spec its module was built from. On load the float model is built from the config, the
listed linears are swapped for empty quantized modules, and the weights are read into them with
the usual checks (a missing scale tensor is refused by name).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from efformer.compress.probs import install_prob_quantizers
from efformer.compress.qlinear import build_module
from efformer.compress.sections import swap_listed_linears
from efformer.models.io import CONFIG_SECTIONS

_NEEDS = {"int_weight": ("bits", "group_size", "symmetric", "bias", "act_order"), "w8a8": ("bias",),
          "linear": ("bias",)}


def apply_quantization_section(model: nn.Module, section: object, path: Path) -> None:
    """Swap the linears a checkpoint's ``quantization`` section lists for empty quantized modules."""
    swap_listed_linears(model, section, path, "quantization", _NEEDS, build_module)
    prob_bits = (section.get("config") or {}).get("prob_bits")
    if prob_bits is not None:
        install_prob_quantizers(model, prob_bits)
    model.quantization = section


CONFIG_SECTIONS["quantization"] = apply_quantization_section
