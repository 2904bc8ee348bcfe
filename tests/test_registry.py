"""The registries: every part is described well enough for `efformer describe` to be useful."""

from __future__ import annotations

import pytest

from efformer.registry import MIXERS, POSITIONALS, describe_mixer


@pytest.mark.parametrize("registry", [MIXERS, POSITIONALS], ids=["mixers", "positional"])
def test_every_option_has_a_one_line_description(registry):
    missing = [f"{name}.{opt}" for name in registry.names()
               for opt, field in registry.get(name).Options.model_fields.items()
               if not (field.description or "").strip() or "\n" in field.description]
    assert missing == []


def test_describe_gives_capabilities_and_each_options_default_and_description():
    info = describe_mixer("sliding_window")
    assert info["name"] == "sliding_window" and info["causal"] and "reference" in info["forms"]
    window = info["options"]["window"]
    assert window["default"] == 128 and window["type"] == "int (>= 1)"
    assert "keys within distance" in window["description"]
