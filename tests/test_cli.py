"""The `efformer` command: list, describe, generate, and clear errors with exit code 2."""

from __future__ import annotations

import json

import efformer
from efformer.cli import main
from efformer.registry import MIXERS


def test_list_shows_every_mixer_with_capabilities(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in MIXERS.names():
        assert f"\n{name} " in out
    assert "positional: " in out and "rope" in out


def test_describe_prints_capabilities_as_json(capsys):
    assert main(["describe", "softmax"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["causal"] and info["exact"] and "n_kv_heads" in info["options"]


def test_unknown_name_is_one_clear_line(capsys):
    assert main(["describe", "sofmax"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efformer: error: unknown mixer 'sofmax'") and "did you mean 'softmax'" in err


def test_generate_from_a_saved_model(tmp_path, capsys):
    model = efformer.create_model("lm-tiny")
    efformer.save(model, tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    ids = model.generate([list(b"ab")], 3)[0]
    assert out.rstrip("\n") == bytes(ids).decode("utf-8", errors="replace")
    assert main(["generate", str(tmp_path / "missing")]) == 2
