"""Rebuilding compressed linears from a ``config.json`` section (quantization, factorization).

A compressed model's folder lists, for every replaced ``nn.Linear``, the spec its module was built
from (``{"modules": {name: spec}}``). On load the float model is built from the config, and each
listed linear is swapped for an empty module of that spec before the weights are read into it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from efformer.errors import CheckpointError


def swap_listed_linears(model: nn.Module, section: object, path: Path, what: str, needs: dict[str, tuple[str, ...]],
                        build: Callable[[dict, int, int], nn.Module]) -> None:
    """Replace every linear the ``what`` section lists by ``build(spec, in, out)``; ``needs`` maps each
    spec kind to its required fields. Any problem with the section is a CheckpointError naming ``path``."""
    modules = section.get("modules") if isinstance(section, dict) else None
    if not isinstance(modules, dict):
        raise CheckpointError(f"{path}: the {what!r} section must be an object with a 'modules' object; "
                              "re-save the model with efformer.save")
    for name, spec in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: {what} lists module {name!r}, which this model does not have; "
                                  "restore the config.json that belongs to these weights") from None
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in needs or any(k not in spec for k in needs[kind]) or not isinstance(old, nn.Linear):
            raise CheckpointError(f"{path}: {what} entry {name!r} = {spec!r} is not a valid linear spec "
                                  f"(kinds: {', '.join(needs)}); re-save the model with efformer.save")
        try:
            new = build(spec, old.in_features, old.out_features)
        except Exception as e:  # noqa: BLE001 - any invalid field (bits out of range, bad layout) is a bad file
            raise CheckpointError(f"{path}: {what} entry {name!r} is invalid ({e})") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
