"""create_model, configs and their errors (save/load: test_io.py)."""

from __future__ import annotations

import pytest

import efformer
from efformer.errors import CapabilityError, ConfigError, UnknownNameError
from efformer.models.config import ModelConfig, build_config
from efformer.registry import MIXERS


def _only(pred):
    names = [m for m in MIXERS.names() if pred(MIXERS.get(m).capabilities)]
    return names[0] if names else None


@pytest.mark.parametrize("preset", efformer.list_presets())
def test_presets_build(preset):
    model = efformer.create_model(preset)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_config_round_trips_through_json():
    cfg = build_config(task="classifier", mixer=["softmax", "softmax"], n_layers=2, positional="t5",
                       positional_options={"num_buckets": 16}, norm_placement="sandwich")
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(d_model=512, n_heads=6), ConfigError, "n_heads=6 does not divide d_model=512"),
        (dict(mixer="sofmax"), UnknownNameError, "did you mean 'softmax'"),
        (dict(positional="rop"), UnknownNameError, "did you mean 'rope'"),
        (dict(norm="rms"), UnknownNameError, "unknown norm 'rms'"),
        (dict(ffn="swishglu"), UnknownNameError, "did you mean 'swiglu'"),
        (dict(d_model=-1), ConfigError, "d_model"),
        (dict(dropout=1.5), ConfigError, "dropout"),
        (dict(task="seq2seq"), ConfigError, "task"),
        (dict(norm_placement="middle"), ConfigError, "norm_placement"),
        (dict(nlayers=2), ConfigError, "nlayers.*unknown key"),
        (dict(mixer=["softmax"], n_layers=2), ConfigError, "mixer list has 1 entries"),
        (dict(mixer_options={"n_kv_heads": "two"}), ConfigError, r"mixer_options\[softmax\].n_kv_heads"),
        (dict(positional_options={"base": 0}), ConfigError, r"positional_options\[rope\].base"),
        (dict(pad_id=300), ConfigError, "pad_id"),
    ],
)
def test_bad_configs_name_the_field(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        efformer.create_model("lm-tiny", **kwargs)


def test_capability_conflicts_are_refused_with_the_reason():
    bidir_only = _only(lambda c: c.bidirectional and not c.causal)
    if bidir_only is not None:
        with pytest.raises(CapabilityError, match=f"mixer '{bidir_only}' is bidirectional only, so it cannot run"):
            efformer.create_model("lm-tiny", mixer=bidir_only, positional="none")
    no_bias = _only(lambda c: not c.attention_bias and c.bidirectional)
    if no_bias is not None:
        with pytest.raises(CapabilityError, match="cannot take an additive attention bias"):
            efformer.create_model("classifier-tiny", mixer=no_bias, positional="alibi")
    assert bidir_only or no_bias or MIXERS.names() == ["softmax"]


def test_hybrid_stack_uses_the_mixer_of_each_layer():
    model = efformer.create_model("lm-tiny", n_layers=3, mixer=["softmax", "softmax", "softmax"],
                                  mixer_options={"softmax": {"n_kv_heads": 1}})
    assert [b.mixer.n_kv_heads for b in model.backbone.blocks] == [1, 1, 1]
