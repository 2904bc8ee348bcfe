"""Name -> class registries for mixers, positional schemes, norms and feed-forward blocks.

The built-in parts register themselves when their modules are imported; ``import efformer``
imports them all, so the registries are full before any lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pydantic.fields import FieldInfo

from efformer.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of classes of one kind, e.g. all token mixers."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator that registers the class under ``name`` (names are unique)."""

        def deco(cls: T) -> T:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> T:
        """The class registered under ``name``; raises UnknownNameError with a suggestion."""
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        """Sorted names of every registered entry."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


MIXERS: Registry = Registry("mixer")
POSITIONALS: Registry = Registry("positional")
NORMS: Registry = Registry("norm")
FFNS: Registry = Registry("ffn")

def register_mixer(name: str):
    """Decorator: register a token-mixer class (a subclass of ``efformer.mixers.Mixer``)."""
    return MIXERS.register(name)


def list_mixers() -> list[str]:
    """Names of every registered token mixer."""
    return MIXERS.names()


def describe_mixer(name: str) -> dict:
    """The capabilities, options and paper of a registered mixer, as a plain dict."""
    cls = MIXERS.get(name)
    info = cls.capabilities.as_dict()
    info["name"] = name
    info["options"] = {k: option_info(f) for k, f in cls.Options.model_fields.items()}
    info["doc"] = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    return info


def option_info(field: FieldInfo) -> dict[str, Any]:
    """An option's type (with its bounds), default (a JSON value, or as Python writes it) and description."""
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = ", ".join(f"{op} {getattr(m, attr)}" for m in field.metadata for attr, op in ops.items()
                       if getattr(m, attr, None) is not None)
    ann = field.annotation
    kind = ann.__name__ if isinstance(ann, type) else re.sub(r"\btyping\.", "", str(ann)).replace("NoneType", "None")
    description = (field.description or "").strip().splitlines()
    default = field.default if isinstance(field.default, str | int | float | bool | type(None)) else repr(field.default)
    return {"type": kind + (f" ({bounds})" if bounds else ""), "default": default,
            "description": description[0] if description else ""}
