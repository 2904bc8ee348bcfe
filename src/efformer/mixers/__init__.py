"""Token mixers: one module per mechanism family, each registering itself on import."""

import importlib
import pkgutil

from efformer.mixers.base import Capabilities, Mixer, MixerOptions, MixerState

__all__ = ["Capabilities", "Mixer", "MixerOptions", "MixerState"]

# Every module in this package is a mechanism family that registers itself; importing them all
# here means a new family file needs no edit anywhere else.
for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
