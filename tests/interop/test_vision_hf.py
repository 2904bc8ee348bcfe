"""Vision checkpoints from Hugging Face: tiny random transformers classifiers saved with save_pretrained
and imported by ``efformer.from_hf`` give the same logits (the HF model is the oracle)."""

from __future__ import annotations

import json

import pytest
import torch

from efformer import from_hf, from_pretrained
from efformer.errors import CheckpointError
from efformer.models.vision import ImageClassifier
from tests.interop.hf_models import _noisy, transformers

T = transformers
_VIT = dict(image_size=12, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=40, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_SWIN = dict(image_size=32, patch_size=2, num_channels=3, embed_dim=12, depths=[2, 2, 1], num_heads=[2, 2, 4],
             window_size=4, mlp_ratio=2.0, num_labels=5, drop_path_rate=0.0)
# 12 x 12 then 6 x 6 then 3 x 3 grids under window 5: padding to window multiples, shifts that wrap,
# and (V2 only, HF's V1 cannot run it) a stage smaller than the window
_SWIN_PADDED = dict(_SWIN, image_size=24, window_size=5, depths=[2, 2], num_heads=[2, 4])
_PVT = dict(image_size=32, num_channels=3, num_encoder_blocks=3, depths=[1, 2, 1], sequence_reduction_ratios=[4, 2, 1],
            hidden_sizes=[8, 16, 24], patch_sizes=[4, 2, 2], strides=[4, 2, 2], num_attention_heads=[1, 2, 3],
            mlp_ratios=[2, 3, 2], num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            drop_path_rate=0.0)
_PVT2 = dict(image_size=32, num_channels=3, num_encoder_blocks=3, depths=[1, 2, 1], sr_ratios=[4, 2, 1],
             hidden_sizes=[8, 16, 24], patch_sizes=[7, 3, 3], strides=[4, 2, 2], num_attention_heads=[1, 2, 3],
             mlp_ratios=[2, 3, 2], num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             drop_path_rate=0.0)
_POOL = dict(num_channels=3, num_encoder_blocks=2, depths=[1, 2], hidden_sizes=[8, 16], patch_sizes=[7, 3],
             strides=[4, 2], padding=[2, 1], mlp_ratio=2.0, num_labels=5)

# depth grows by stage: HF CvT indexes its per-stage drop-path list by the stage number
_CVT = dict(num_channels=3, patch_sizes=[7, 3, 3], patch_stride=[4, 2, 2], patch_padding=[2, 1, 1],
            embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 3], mlp_ratio=[2.0, 3.0, 2.0],
            attention_drop_rate=[0.0] * 3, drop_rate=[0.0] * 3, drop_path_rate=[0.0] * 3, qkv_bias=[True] * 3,
            cls_token=[False, False, True],
            qkv_projection_method=["dw_bn"] * 3, kernel_qkv=[3] * 3, padding_kv=[1] * 3, stride_kv=[2] * 3,
            padding_q=[1] * 3, stride_q=[1] * 3, num_labels=5)
CASES = {  # name -> (model class, config class, config, image side)
    "vit": (T.ViTForImageClassification, T.ViTConfig, _VIT, 12),
    "deit": (T.DeiTForImageClassificationWithTeacher, T.DeiTConfig, _VIT, 12),
    "swin": (T.SwinForImageClassification, T.SwinConfig, _SWIN, 32),
    "swin-padded": (T.SwinForImageClassification, T.SwinConfig, _SWIN_PADDED, 24),
    "swinv2": (T.Swinv2ForImageClassification, T.Swinv2Config, _SWIN, 32),
    "swinv2-padded": (T.Swinv2ForImageClassification, T.Swinv2Config, dict(_SWIN_PADDED, depths=[2, 2, 2],
                                                                           num_heads=[2, 2, 4]), 24),
    "pvt": (T.PvtForImageClassification, T.PvtConfig, _PVT, 32),
    "pvt_v2": (T.PvtV2ForImageClassification, T.PvtV2Config, _PVT2, 32),
    "pvt_v2-linear": (T.PvtV2ForImageClassification, T.PvtV2Config, dict(_PVT2, linear_attention=True), 32),
    "cvt": (T.CvtForImageClassification, T.CvtConfig, _CVT, 32),
    "poolformer": (T.PoolFormerForImageClassification, T.PoolFormerConfig, _POOL, 16),
}


def _saved(name: str, tmp_path, **overrides):
    model_cls, cfg_cls, cfg, side = CASES[name]
    torch.manual_seed(0)
    hf = _noisy(model_cls(cfg_cls(**{**cfg, **overrides})))
    hf.save_pretrained(tmp_path / name)
    return hf, tmp_path / name, side


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(name, tmp_path):
    hf, folder, side = _saved(name, tmp_path)
    ours = from_hf(folder)
    assert isinstance(ours, ImageClassifier)
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(pixel_values=images).logits, ours(images)
    assert got.shape == want.shape == (2, 5)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    assert from_pretrained(folder).cfg == ours.cfg  # the either-kind loader finds the HF folder too


def test_shifted_swin_would_differ_without_the_mask(tmp_path):
    """The parity above is not vacuous: dropping the shifted-window mask changes the logits."""
    hf, folder, side = _saved("swin", tmp_path)
    ours = from_hf(folder)
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    for blocks in ours.stages:
        for block in blocks[1::2]:
            block.mixer.opts = block.mixer.opts.model_copy(update={"shift": 0})
    with torch.no_grad():
        assert (ours(images) - hf(pixel_values=images).logits).abs().max() > 1e-3


def test_unmapped_settings_and_heads_are_refused(tmp_path):
    _, folder, _ = _saved("swin", tmp_path, use_absolute_embeddings=True)
    with pytest.raises(CheckpointError, match="use_absolute_embeddings"):
        from_hf(folder)
    torch.manual_seed(0)
    T.DeiTForImageClassification(T.DeiTConfig(**_VIT)).save_pretrained(tmp_path / "deit-plain")
    with pytest.raises(CheckpointError, match="DeiTForImageClassificationWithTeacher"):
        from_hf(tmp_path / "deit-plain")


def test_bad_vision_folders_name_the_file(tmp_path):
    _, folder, _ = _saved("pvt", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_sizes": [8, 16, 36]}))
    with pytest.raises(CheckpointError, match="model.safetensors.*do not fit"):
        from_hf(folder)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "depths"}))
    with pytest.raises(CheckpointError, match="lacks the field 'depths'"):
        from_hf(folder)


@pytest.mark.parametrize("name", ["vit", "deit", "swin"])
def test_the_loaded_models_own_key_names_import_too(name, tmp_path):
    """transformers 5 saves the earlier key layout (``...attention.attention.query``) but names the loaded
    modules anew (``...attention.q_proj``); a folder written from ``state_dict()`` directly has the new names."""
    from safetensors.torch import save_file

    hf, folder, side = _saved(name, tmp_path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(folder / "model.safetensors"))
    assert any("q_proj" in k for k in hf.state_dict())
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(pixel_values=images).logits, from_hf(folder)(images)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
