"""Model configs: mixer options per layer, forms checked at config time, max_len reaching every mixer."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.models.config import build_config


def test_one_dict_for_one_mixer_reaches_every_layer():
    m = efformer.create_model("lm-tiny", n_layers=3, mixer="sliding_window", mixer_options={"window": 3})
    assert [b.mixer.opts.window for b in m.backbone.blocks] == [3, 3, 3]


def test_a_list_of_options_aligns_with_the_list_of_mixers():
    m = efformer.create_model("lm-tiny", n_layers=3, mixer=["sliding_window", "softmax", "sliding_window"],
                              mixer_options=[{"window": 3}, {"n_kv_heads": 1}, {"window": 5}])
    blocks = m.backbone.blocks
    assert (blocks[0].mixer.opts.window, blocks[1].mixer.n_kv_heads, blocks[2].mixer.opts.window) == (3, 1, 5)


def test_a_dict_keyed_by_mixer_name_applies_to_each_layer_of_that_mixer():
    m = efformer.create_model("lm-tiny", n_layers=3, mixer=["sliding_window", "softmax", "sliding_window"],
                              mixer_options={"sliding_window": {"window": 3}})
    assert [getattr(b.mixer.opts, "window", None) for b in m.backbone.blocks] == [3, None, 3]


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        # the case that was silently ignored: a flat dict with a list of mixers
        (dict(mixer=["sliding_window", "softmax"], mixer_options={"window": 3}), r"\{'window': 3\} are not mixers"),
        (dict(mixer=["sliding_window", "softmax"], mixer_options=[{"window": 3}]), "has 1 entries but mixer has 2"),
        (dict(mixer="softmax", mixer_options=[{}, {}]), "a list, but mixer='softmax'"),
        (dict(mixer=["sliding_window", "softmax"], mixer_options=[{"window": 3}, {"window": 3}]),
         r"mixer_options\[1\].window"),
        (dict(mixer="softmax", mixer_options={"form": "chunked"}), r"mixer_options\[softmax\].form=.*has no form"),
        (dict(mixer="softmax", mixer_options={"n_kv_heads": 3}), "n_kv_heads=3"),  # the constructor's own check
        (dict(mixer="gla", mixer_options={"form": 3}), r"mixer_options\[gla\].form"),
    ],
)
def test_options_that_cannot_apply_are_refused_with_the_field(kwargs, pattern):
    with pytest.raises(efformer.EfformerError, match=pattern):
        build_config(n_layers=2, **kwargs)


def test_model_max_len_is_the_mixers_max_len():
    m = efformer.create_model("classifier-tiny", mixer="linformer", max_len=96)
    mixer = m.backbone.blocks[0].mixer
    assert mixer.max_len == 96 and mixer.e_proj.shape[-1] == 96
    with pytest.raises(ConfigError, match="max_len"):
        type(mixer)(32, 4, max_len=0)
    with pytest.raises(ConfigError, match="max_len"):
        build_config(mixer="linformer", task="classifier", mixer_options={"max_len": 64})


def test_interop_settings_reach_the_parts():
    """norm_eps, ffn_bias, head_dim and embed_norm: each validated and built into the model."""
    cfg = build_config(vocab_size=11, d_model=16, n_heads=2, n_layers=1, norm="layernorm", norm_eps=1e-3,
                       ffn="swiglu", ffn_bias=True, head_dim=4, embed_norm=True)
    m = efformer.models.CausalLM(cfg)
    blk = m.backbone.blocks[0]
    assert blk.norm1.eps == 1e-3 and m.backbone.final_norm.eps == 1e-3 and m.backbone.embed_norm.eps == 1e-3
    assert blk.ffn.gate_up.bias is not None and blk.mixer.q_proj.out_features == 2 * 4
    assert m.backbone.pos.rot_dim == 4
    assert m(torch.randint(0, 11, (1, 5))).shape == (1, 5, 11)
    with pytest.raises(ConfigError, match="head_dim"):
        build_config(mixer="linear", positional="none", head_dim=4)
    with pytest.raises(ConfigError, match="norm_eps"):
        build_config(norm_eps=0.0)
