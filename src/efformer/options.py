"""Option validation shared by every configurable part: strict pydantic models, errors that name the field."""

from __future__ import annotations

from typing import Any

import pydantic

from efformer.errors import ConfigError


class StrictModel(pydantic.BaseModel):
    """A pydantic model that refuses unknown keys."""

    model_config = pydantic.ConfigDict(extra="forbid")


def validate_options(model: type[pydantic.BaseModel], options: Any, owner: str) -> Any:
    """Validate ``options`` (dict or model) against ``model``; raise ConfigError naming the field."""
    if isinstance(options, model):
        return options
    if options is None:
        options = {}
    if isinstance(options, pydantic.BaseModel):
        options = options.model_dump()
    if not isinstance(options, dict):
        raise ConfigError(f"{owner}.options", options, "a dict of option names to values")
    try:
        return model.model_validate(options)
    except pydantic.ValidationError as e:
        raise config_error(e, owner, model) from None


def config_error(e: pydantic.ValidationError, owner: str, model: type[pydantic.BaseModel]) -> ConfigError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field = f"{owner}.{loc}" if owner and loc else (owner or loc or "config")
    if err["type"] == "extra_forbidden":
        allowed = "unknown key; allowed: " + ", ".join(model.model_fields)
    else:
        allowed = err["msg"]
    return ConfigError(field, err.get("input"), allowed)


__all__ = ["StrictModel", "config_error", "validate_options"]
