"""Log2-quantized attention probabilities (FQ-ViT): values, zeros kept, causality, save/load, refusals."""

from __future__ import annotations

import math

import pytest
import torch

import efformer
from efformer.compress import W8A8Config, quantize
from efformer.compress.probs import Log2ProbQuantizer, install_prob_quantizers
from efformer.errors import ConfigError
from efformer.mixers.softmax import SoftmaxAttention

IDS = torch.randint(1, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def _model(mixer="softmax", **kw):
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=64, n_layers=2, n_heads=4, mixer=mixer, **kw).eval()


def test_every_weight_becomes_a_power_of_two_and_zeros_stay_zero():
    p = torch.softmax(torch.randn(2, 3, 5, 7) * 3, -1)
    p[..., -2:] = 0  # masked keys
    q = Log2ProbQuantizer(4)(p)
    assert torch.equal(q[..., -2:], torch.zeros_like(q[..., -2:]))
    codes = -torch.log2(q[..., :-2])
    assert torch.equal(codes, codes.round()) and codes.max() <= 15 and codes.min() >= 0
    # the nearest power of two in log space: |log2 p - log2 q| <= 1/2 wherever p is within the code range
    inside = p[..., :-2] >= 2.0 ** -15
    assert ((torch.log2(p[..., :-2]) - torch.log2(q[..., :-2])).abs()[inside] <= 0.5 + 1e-6).all()


def test_the_quantized_mixer_equals_attention_computed_by_hand_with_log2_weights():
    torch.manual_seed(1)
    mixer = SoftmaxAttention(32, 4, causal=True).eval()
    x = torch.randn(2, 11, 32)
    mixer.prob_quantizer = Log2ProbQuantizer(3)
    out, _ = mixer(x)
    q = mixer.split_heads(mixer.q_proj(x))
    k, v = mixer.split_heads(mixer.kv_proj(x), 8).chunk(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(mixer.head_dim)
    scores = scores.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
    p = scores.softmax(-1)
    p_hat = torch.where(p > 0, torch.exp2(-torch.round(-torch.log2(p)).clamp(0, 7)), torch.zeros_like(p))
    ref = mixer.out_proj(mixer.merge_heads(p_hat @ v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_quantized_probabilities_keep_the_lm_causal():
    m = quantize(_model(), W8A8Config(prob_bits=4))
    other = IDS.clone()
    other[:, 9:] = torch.randint(1, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m(IDS)[:, :9], m(other)[:, :9], rtol=0, atol=0)


def test_more_bits_only_extend_the_range_and_the_folder_reloads_identically(tmp_path):
    # Codes are round(-log2 p): bits set the smallest weight kept (2^-(2^bits - 1)), not the step. Error falls
    # until the range covers every weight of the input, then stays at the log-domain rounding error.
    ref = _model()(IDS)
    errs = {}
    for bits in (2, 3, 4, 8):
        m = quantize(_model(), W8A8Config(prob_bits=bits, quantize=False))
        errs[bits] = ((m(IDS) - ref).norm() / ref.norm()).item()
    assert errs[2] > errs[3] > 0 and errs[4] == errs[8] > 0
    m = quantize(_model(), W8A8Config(prob_bits=4))
    efformer.save(m, tmp_path / "q")
    back = efformer.load(tmp_path / "q")
    assert all(isinstance(b.mixer.prob_quantizer, Log2ProbQuantizer) for b in back.backbone.blocks)
    assert torch.equal(back(IDS), m(IDS))


def test_a_model_without_softmax_attention_is_refused_and_left_untouched():
    m = _model("gated_deltanet", positional="none")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="prob_bits"):
        quantize(m, W8A8Config(prob_bits=4))
    assert not getattr(m, "quantization", None)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ConfigError, match="prob_bits"):
        W8A8Config(prob_bits=1)
    with pytest.raises(ConfigError, match="prob_bits"):
        install_prob_quantizers(m, 4)
