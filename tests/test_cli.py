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


def test_list_fits_100_columns_and_shows_rotary_and_bias(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    header = out.splitlines()[0].split()
    assert {"rope", "bias", "causal", "decode"} <= set(header)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split()}
    caps = MIXERS.get("softmax").capabilities
    assert rows["softmax"][header.index("rope")] == ("y" if caps.rotary else "-")
    assert rows["linear"][header.index("bias")] == ("y" if MIXERS.get("linear").capabilities.attention_bias else "-")


def test_list_wide_has_every_column_in_full(capsys):
    assert main(["list", "--wide"]) == 0
    out = capsys.readouterr().out
    for name in MIXERS.names():
        caps = MIXERS.get(name).capabilities
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert caps.time in line and caps.memory in line and ",".join(caps.forms) in line


def test_list_json_is_machine_readable(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in data["mixers"]}
    assert sorted(by_name) == MIXERS.names()
    assert by_name["softmax"]["rotary"] is True and "attention_bias" in by_name["linear"]
    assert "rope" in data["positional"] and "rmsnorm" in data["norm"] and "swiglu" in data["ffn"]


def test_describe_shows_each_option_with_type_default_and_description(capsys):
    assert main(["describe", "s4d"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("s4d: ") and "paper: " in out
    table = out[out.index("option "):].splitlines()
    assert table[0].split() == ["option", "type", "default", "description"]
    rows = {line.split()[0]: line for line in table[2:]}
    opts = MIXERS.get("s4d").Options.model_fields
    assert set(rows) == set(opts)
    assert "int (>= 2)" in rows["d_state"] and " 64 " in rows["d_state"]
    assert "float (> 0)" in rows["dt_min"] and "0.001" in rows["dt_min"]
    assert "Literal" in rows["init"] and "'lin'" in rows["init"]


def test_describe_json_has_typed_options(capsys):
    assert main(["describe", "softmax", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["causal"] and info["exact"]
    kv = info["options"]["n_kv_heads"]
    assert kv["default"] is None and "int" in kv["type"] and kv["description"]


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
