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
from efformer.errors import CheckpointError
from efformer.models.io import CONFIG_SECTIONS

KINDS = ("int_weight", "w8a8", "linear")
_NEEDS = {"int_weight": ("bits", "group_size", "symmetric", "bias", "act_order"), "w8a8": ("bias",),
          "linear": ("bias",)}


def apply_quantization_section(model: nn.Module, section: object, path: Path) -> None:
    """Swap the linears a checkpoint's ``quantization`` section lists for empty quantized modules."""
    modules = section.get("modules") if isinstance(section, dict) else None
    if not isinstance(modules, dict):
        raise CheckpointError(f"{path}: the 'quantization' section must be an object with a 'modules' object; "
                              "re-save the quantized model with efformer.save")
    for name, spec in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: quantization lists module {name!r}, which this model does not have; "
                                  "restore the config.json that belongs to these weights") from None
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in KINDS or any(k not in spec for k in _NEEDS[kind]) or not isinstance(old, nn.Linear):
            raise CheckpointError(f"{path}: quantization entry {name!r} = {spec!r} is not a quantized linear spec "
                                  f"(kinds: {', '.join(KINDS)}); re-save the quantized model with efformer.save")
        try:
            new = build_module(spec, old.in_features, old.out_features)
        except Exception as e:  # noqa: BLE001 - any invalid field (bits out of range, bad group) is a bad file
            raise CheckpointError(f"{path}: quantization entry {name!r} is invalid ({e})") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    prob_bits = (section.get("config") or {}).get("prob_bits")
    if prob_bits is not None:
        install_prob_quantizers(model, prob_bits)
    model.quantization = section


CONFIG_SECTIONS["quantization"] = apply_quantization_section
