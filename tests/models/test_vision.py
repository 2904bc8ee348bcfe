"""Image classifiers: presets build and learn, the grid reaches the 2-D mixers, positions and stages
behave, save/load round-trips, and bad input is refused with the field and the fix."""

from __future__ import annotations

import io

import pytest
import torch

import efformer
from efformer.errors import CapabilityError, ConfigError, ShapeError, UnknownNameError
from efformer.models.vision import VISION_PRESETS, ImageClassifier, build_vision_config, create_image_model

IMAGE_MIXERS = ["swin", "maxvit_grid", "neighborhood", "sra", "linear_sra", "pool", "identity", "xca", "vim",
                "manhattan", "cvt", "cswin"]


@pytest.mark.parametrize("preset", sorted(VISION_PRESETS))
def test_presets_give_logits_and_every_parameter_a_gradient(preset):
    torch.manual_seed(0)
    model = efformer.create_model(preset)
    assert isinstance(model, ImageClassifier) and preset in efformer.list_presets()
    y = model(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and (p.grad != 0).any(), f"{preset}: {name} gets no gradient"


@pytest.mark.parametrize("mixer", IMAGE_MIXERS)
def test_every_2d_mixer_runs_in_a_staged_model_on_odd_grids(mixer):
    torch.manual_seed(0)
    model = efformer.create_model("swin-tiny", mixer=mixer, mixer_options={}, image_size=28)  # grids 14, 7, 4
    assert model(torch.rand(1, 3, 28, 28)).shape == (1, 10)


def test_the_model_passes_each_stage_its_grid():
    model = efformer.create_model("swin-tiny")
    seen = []
    for blocks in model.stages:
        mixer = blocks[0].mixer
        mixer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["positions"].grid), with_kwargs=True)
    model(torch.rand(1, 3, 32, 32))
    assert seen == [(16, 16), (8, 8), (4, 4)]


def test_swin_preset_alternates_plain_and_shifted_windows():
    model = efformer.create_model("swin-tiny")
    assert [b.mixer.opts.shift for b in model.stages[0]] == [0, 2]


def test_deit_distillation_token_has_its_own_head_and_eval_averages_them():
    torch.manual_seed(0)
    model = efformer.create_model("deit-tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    cls_logits, dist_logits = model(x, both_heads=True)
    assert not torch.allclose(cls_logits, dist_logits)
    assert torch.allclose(model(x), (cls_logits + dist_logits) / 2)


@pytest.mark.parametrize("positional", ["none", "learned", "sincos2d", "rope2d", "cpe"])
def test_positional_schemes_make_the_model_see_where_patches_are(positional):
    """Swapping two patches changes the logits iff the model has a positional scheme (mean-pooled ViT)."""
    torch.manual_seed(0)
    model = efformer.create_model("vit-tiny", positional=positional, pooling="mean").eval()
    x = torch.rand(1, 3, 32, 32)
    swapped = x.clone()
    swapped[..., :4, :4], swapped[..., 28:, 28:] = x[..., 28:, 28:], x[..., :4, :4]
    moved = (model(x) - model(swapped)).abs().max()
    assert (moved > 1e-5) == (positional != "none")


def test_learned_positions_resize_to_other_image_sizes():
    model = efformer.create_model("vit-tiny")
    assert model(torch.rand(1, 3, 48, 48)).shape == (1, 10)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = efformer.create_model("pvt-tiny", n_classes=4).eval()
    efformer.save(model, tmp_path / "m")
    again = efformer.load(tmp_path / "m").eval()
    x = torch.rand(2, 3, 32, 32)
    assert again.cfg == model.cfg and torch.equal(model(x), again(x))


def test_digits_train_above_chance_in_a_few_steps(tmp_path):
    from efformer.data.images import digits
    from efformer.train.trainer import Trainer

    torch.manual_seed(0)
    train, test = digits(16).split(0.8)
    model = efformer.create_model("vit-tiny", image_size=16, in_channels=1, stages=[dict(depth=1, d_model=32,
                                                                                        n_heads=2)])
    trainer = Trainer(model, {"steps": 80, "batch_size": 32, "lr": 3e-3, "eval_every": 0, "log_every": 80},
                      train, test, out_dir=tmp_path / "run", progress_stream=io.StringIO())
    result = trainer.fit()  # the trainer batches {"images", "label"} and saves the image model at the end
    assert result["eval_accuracy"] > 0.3  # chance is 0.1
    assert isinstance(efformer.load(tmp_path / "run" / "model"), ImageClassifier)


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    (dict(patch_size=5), ConfigError, "patch_size=5 does not divide image_size=32"),
    (dict(mixer="swin", pooling="cls"), ConfigError, "takes only patch tokens"),
    (dict(mixer="swin", positional="rope2d", pooling="mean"), CapabilityError, "cannot take a rotary scheme"),
    (dict(mixer="sofmax"), UnknownNameError, "did you mean 'softmax'"),
    (dict(mixer="swin", pooling="mean", mixer_options={"window": 0}), ConfigError, "window"),
    (dict(stem="conv", patch_size=6, image_size=24), ConfigError, "power of 2"),
    (dict(distillation=True, pooling="mean"), ConfigError, "distillation"),
    (dict(stages=[dict(d_model=30, n_heads=4)]), ConfigError, "n_heads=4 does not divide d_model=30"),
])
def test_bad_configs_name_the_field_and_the_fix(kwargs, error, words):
    with pytest.raises(error, match=words):
        efformer.create_model("vit-tiny", **kwargs)


def test_two_stage_model_refuses_a_class_token():
    with pytest.raises(ConfigError, match="pooling='cls' needs one stage"):
        build_vision_config(VISION_PRESETS["swin-tiny"], pooling="cls")


def test_bad_images_are_refused():
    model = create_image_model("vit-tiny")
    with pytest.raises(ShapeError, match="1 channels but the model takes in_channels=3"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ShapeError, match="not a multiple of the patch size 4"):
        model(torch.rand(1, 3, 30, 32))


def test_a_2d_mixer_in_a_text_model_is_refused_at_config_time():
    with pytest.raises(CapabilityError, match="mixes a 2-D grid of image patches"):
        efformer.create_model("classifier-tiny", mixer="swin")
    with pytest.raises(CapabilityError, match="mixes a 2-D grid"):
        efformer.create_model("classifier-tiny", mixer=["softmax", "neighborhood"], n_layers=2)


def test_pvt_layout_positions_per_stage_and_a_class_token_at_the_last_stage():
    cfg = dict(patch_size=2, patch_norm=True, merge="conv", positional="learned_stages", pooling="cls",
               class_token_stage="last", stages=[dict(depth=1, d_model=8, n_heads=1, mixer="sra",
                                                      mixer_options={"ratio": 2}),
                                                 dict(depth=1, d_model=16, n_heads=2)])
    model = create_image_model(cfg)
    assert [tuple(p.shape) for p in model.stage_pos] == [(256, 8), (64, 16)] and model.extra.shape == (1, 16)
    x = torch.rand(2, 3, 32, 32)
    y = model(x)
    with torch.no_grad():  # the class token reads the last stage only: its position shifts the logits
        model.pos_extra.add_(1.0)
    assert not torch.allclose(model(x), y)
    with pytest.raises(ConfigError, match="takes only patch tokens"):  # sra has no place for the class token
        create_image_model({**cfg, "stages": [cfg["stages"][0], {**cfg["stages"][0], "d_model": 16}]})


def test_cvt_mixer_takes_the_class_token_only_when_told():
    stage = dict(depth=1, d_model=16, n_heads=2, mixer="cvt")
    model = create_image_model(dict(patch_size=4, positional="none", pooling="cls",
                                    stages=[{**stage, "mixer_options": {"leading_tokens": 1}}]))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="leading_tokens"):
        create_image_model(dict(patch_size=4, positional="none", pooling="mean",
                                stages=[{**stage, "mixer_options": {"leading_tokens": 1}}]))


def test_overlap_and_token_mixing_norms_are_checked():
    with pytest.raises(ConfigError, match="patch_kernel"):
        create_image_model("vit-tiny", patch_kernel=11, patch_padding=1)
    with pytest.raises(ConfigError, match="statistics over all tokens"):
        efformer.create_model("lm-tiny", norm="groupnorm")
    with pytest.raises(ConfigError, match="convolves a 2-D grid"):
        efformer.create_model("classifier-tiny", ffn="mixffn")
