"""The efformer error hierarchy: every user-facing failure names the field, the value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EfformerError(Exception):
    """Base class of every error efformer raises on purpose."""


class ConfigError(EfformerError, ValueError):
    """A configuration value is invalid: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: {allowed}")


class UnknownNameError(EfformerError, KeyError):
    """A name looked up in a registry does not exist; suggests the closest match."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        msg = f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class CapabilityError(EfformerError, ValueError):
    """A combination of parts cannot work (e.g. a bidirectional-only mixer in a causal LM)."""


class ShapeError(EfformerError, ValueError):
    """A tensor given to efformer has the wrong shape, dtype or device."""


class CheckpointError(EfformerError, OSError):
    """A saved model or training checkpoint is missing, truncated or does not match its config."""


class DataError(EfformerError, ValueError):
    """A data file is missing or malformed; names the file and the line."""
