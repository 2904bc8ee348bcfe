"""Run configs: files + --set overrides, and a table of bad inputs each refused with the right error
type and a message naming the key path."""

from __future__ import annotations

import pytest

from efformer.errors import ConfigError
from efformer.train.config import apply_overrides, build_run_config, load_run_config

GOOD = {"model": {"preset": "lm-tiny", "d_model": 32, "n_heads": 2}, "data": {"name": "copy"},
        "train": {"steps": 10}}

# (raw config changes, --set overrides, error type, text the message must contain)
BAD = [
    ({"trian": {}}, [], ConfigError, "trian"),
    ({}, ["train.stpes=5"], ConfigError, "train.stpes"),
    ({}, ["train.steps=0"], ConfigError, "train.steps"),
    ({}, ["train.steps=abc"], ConfigError, "train.steps"),
    ({}, ["train.lr=-1"], ConfigError, "train.lr"),
    ({}, ["train.schedule=exponential"], ConfigError, "train.schedule"),
    ({}, ["train.precision=fp8"], ConfigError, "train.precision"),
    ({}, ["train.parallel=zero3"], ConfigError, "train.parallel"),
    ({}, ["train.warmup_steps=50"], ConfigError, "train.warmup_steps"),
    ({}, ["train.min_lr_ratio=2"], ConfigError, "train.min_lr_ratio"),
    ({}, ["train.betas=[0.9]"], ConfigError, "train.betas"),
    ({}, ["train.clip_grad=0"], ConfigError, "train.clip_grad"),
    ({}, ["train.keep_last=0"], ConfigError, "train.keep_last"),
    ({"train": 5}, [], ConfigError, "train"),
    ({}, ["model.d_model=-4"], ConfigError, "model.d_model"),
    ({}, ["model.dmodel=64"], ConfigError, "model.dmodel"),
    ({}, ["model.mixer=sofmax"], ConfigError, "model.mixer"),
    ({}, ["model.norm=batchnorm"], ConfigError, "model.norm"),
    ({}, ["model.preset=lm-huge"], ConfigError, "model.preset"),
    ({}, ["model.task=regression"], ConfigError, "model.task"),
    ({}, ["model.n_heads=3"], ConfigError, "n_heads"),
    ({}, ["model.mixer_options.bogus=1"], ConfigError, "mixer_options[softmax].bogus"),
    ({}, ["data.name=imagenet"], ConfigError, "data.name"),
    ({}, ["data.options.length=0"], ConfigError, "data.options.length"),
    ({}, ["data.options.lenght=4"], ConfigError, "data.options.lenght"),
    ({"data": {"name": "text", "options": {"path": "/nonexistent/corpus.txt"}}}, [], ConfigError,
     "data.options.path"),
    ({}, ["train.steps"], ConfigError, "--set"),
    ({}, ["train..steps=3"], ConfigError, "--set"),
    ({}, ["train.steps.inner=3"], ConfigError, "train.steps"),
]


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("changes,overrides,err,needle", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_config_is_refused_naming_the_key(changes, overrides, err, needle, tmp_path):
    from efformer.train.data import build_datasets

    with pytest.raises(err) as info:
        cfg = build_run_config(_merge(GOOD, changes), overrides)
        build_datasets(cfg.data, cfg.build_model_config())  # data paths are checked when data is built
    assert needle in str(info.value)


def test_there_are_at_least_twenty_bad_inputs():
    assert len(BAD) >= 20


def test_bad_files_name_the_file_and_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_run_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"line \d"):
        load_run_config(bad)
    badjson = tmp_path / "bad.json"
    badjson.write_text('{"train": {"steps": 3,}}')
    with pytest.raises(ConfigError, match="line 1"):
        load_run_config(badjson)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(listy)


def test_file_plus_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\nmodel: {preset: lm-tiny, d_model: 32, n_heads: 2}\ntrain: {steps: 7, lr: 0.01}\n")
    sets = ["train.lr=3e-4", "model.mixer=softmax", "data.name=copy", "data.options.length=5", "train.betas=[0.8, 0.9]"]
    cfg = load_run_config(path, sets)
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.betas == (0.8, 0.9)
    assert cfg.data.options == {"length": 5}
    mc = cfg.build_model_config()
    assert (mc.d_model, mc.n_heads, mc.n_layers) == (32, 2, 2)  # preset supplies n_layers
    assert str(cfg.output_dir()).endswith("demo")
    # overrides never touch the input dict
    raw = {"train": {"steps": 1}}
    assert apply_overrides(raw, ["train.steps=2"])["train"]["steps"] == 2 and raw["train"]["steps"] == 1
