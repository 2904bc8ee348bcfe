"""SmoothQuant and OS+: exact without quantization, and they lower W8A8 error on an outlier channel."""

from __future__ import annotations

import copy

import pytest
import torch

import efformer
from efformer.compress import W8A8Config, quantize
from efformer.compress.smooth import find_pairs


def _model(norm="rmsnorm", seed=0):
    torch.manual_seed(seed)
    return efformer.create_model("lm-tiny", d_model=64, n_layers=2, n_heads=4, ffn_mult=2.0, norm=norm).eval()


def _inject_outlier(model, channel=3, factor=100.0):
    """Scale one channel of every norm's output by ``factor`` and undo it in the linears reading it (exact)."""
    with torch.no_grad():
        for blk in model.backbone.blocks:
            for norm, lins in ((blk.norm1, (blk.mixer.q_proj, blk.mixer.kv_proj)), (blk.norm2, (blk.ffn.gate_up,))):
                norm.weight[channel] *= factor
                if getattr(norm, "bias", None) is not None:
                    norm.bias[channel] *= factor
                for lin in lins:
                    lin.weight[:, channel] /= factor


IDS = torch.randint(1, 256, (4, 24), generator=torch.Generator().manual_seed(0))
CAL = torch.randint(1, 256, (8, 24), generator=torch.Generator().manual_seed(1))


def test_pairs_found_by_tensor_identity():
    m = _model()
    pairs = {p.norm_name: sorted(p.linears) for p in find_pairs(m, CAL, {
        n: x for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)})}
    assert pairs["backbone.blocks.0.norm1"] == ["backbone.blocks.0.mixer.kv_proj", "backbone.blocks.0.mixer.q_proj"]
    assert pairs["backbone.blocks.1.norm2"] == ["backbone.blocks.1.ffn.gate_up"]
    assert len(pairs) == 4  # out_proj and down read no norm: left alone, as in the paper


@pytest.mark.parametrize("smoothing,alpha", [("smoothquant", 0.0), ("smoothquant", 0.5), ("smoothquant", 0.85),
                                             ("smoothquant", 1.0), ("osplus", 0.5)])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_transform_without_quantization_is_exact(smoothing, alpha, norm):
    m = _model(norm)
    _inject_outlier(m)
    ref = m(IDS)
    s = quantize(copy.deepcopy(m), W8A8Config(smoothing=smoothing, alpha=alpha, quantize=False), CAL)
    out = s(IDS)
    assert (out - ref).norm() / ref.norm() < 1e-5
    changed = not torch.equal(s.backbone.blocks[0].norm1.weight, m.backbone.blocks[0].norm1.weight)
    assert changed or alpha == 0.0 and smoothing == "smoothquant"


def test_osplus_shift_folds_into_layernorm_bias_and_linear_bias():
    m = _model("layernorm")
    with torch.no_grad():
        for blk in m.backbone.blocks:
            blk.norm1.bias += 2.0  # an asymmetric channel the shift removes
    s = quantize(copy.deepcopy(m), W8A8Config(smoothing="osplus", quantize=False), CAL)
    assert s.backbone.blocks[0].mixer.q_proj.bias is not None
    assert s.quantization["modules"]["backbone.blocks.0.mixer.q_proj"] == {"kind": "linear", "bias": True}
    assert (s(IDS) - m(IDS)).norm() / m(IDS).norm() < 1e-5


@pytest.mark.parametrize("smoothing", ["smoothquant", "osplus"])
def test_smoothing_lowers_w8a8_error_with_an_outlier_channel(smoothing):
    m = _model("layernorm")
    _inject_outlier(m)
    ref = m(IDS)
    naive = quantize(copy.deepcopy(m), W8A8Config(), CAL)(IDS)
    smoothed = quantize(copy.deepcopy(m), W8A8Config(smoothing=smoothing), CAL)(IDS)
    e_naive, e_smooth = (naive - ref).norm().item(), (smoothed - ref).norm().item()
    assert e_smooth < 0.7 * e_naive, (e_naive, e_smooth)
