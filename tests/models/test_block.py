"""The block: each norm placement computes its published formula."""

from __future__ import annotations

import pytest
import torch

from efformer.models.block import Block, deepnorm_constants
from efformer.models.config import build_config


def _block(placement):
    cfg = build_config(d_model=16, n_heads=2, n_layers=3, norm_placement=placement, positional="none",
                       norm="layernorm")
    torch.manual_seed(0)
    return Block(cfg, "softmax", {}).eval()


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "sandwich", "deepnorm"])
def test_placement_formula(placement):
    blk = _block(placement)
    x = torch.randn(2, 5, 16)
    pos = torch.arange(5).expand(2, 5)
    got, _ = blk(x, mask=None, state=None, positions=pos)

    def mix(h):
        return blk.mixer(h, positions=pos)[0]

    if placement == "pre":
        h = x + mix(blk.norm1(x))
        want = h + blk.ffn(blk.norm2(h))
    elif placement in ("peri", "sandwich"):
        h = x + blk.out_norm1(mix(blk.norm1(x)))
        want = h + blk.out_norm2(blk.ffn(blk.norm2(h)))
    else:
        a = deepnorm_constants(3)[0] if placement == "deepnorm" else 1.0
        h = blk.norm1(a * x + mix(x))
        want = blk.norm2(a * h + blk.ffn(h))
    assert torch.allclose(got, want, atol=1e-6)


def test_deepnorm_constants_and_init_scaling():
    alpha, beta = deepnorm_constants(6)
    assert alpha == pytest.approx(12**0.25) and beta == pytest.approx(48**-0.25)
    torch.manual_seed(0)
    plain = _block("post")
    torch.manual_seed(0)
    deep = _block("deepnorm")
    b = deepnorm_constants(3)[1]
    assert torch.allclose(deep.mixer.q_proj.weight, plain.mixer.q_proj.weight)  # queries untouched
    kv_p, kv_d = plain.mixer.kv_proj.weight, deep.mixer.kv_proj.weight
    half = kv_p.shape[0] // 2
    assert torch.allclose(kv_d[:half], kv_p[:half]) and torch.allclose(kv_d[half:], kv_p[half:] * b)
    assert torch.allclose(deep.ffn.down.weight, plain.ffn.down.weight * b)


def test_res_post_and_layer_scale_formulas():
    """Swin V2's res-post-norm x + norm(f(x)); CaiT / PoolFormer's layer scale x + gamma * f(norm(x))."""
    pos = torch.arange(5).expand(2, 5)
    x = torch.randn(2, 5, 16)
    for placement in ("res_post", "pre"):
        cfg = build_config(d_model=16, n_heads=2, n_layers=1, norm_placement=placement, positional="none",
                           norm="layernorm", layer_scale=0.1)
        torch.manual_seed(0)
        blk = Block(cfg, "softmax", {}).eval()
        with torch.no_grad():
            blk.scale1.normal_(), blk.scale2.normal_()
        got, _ = blk(x, mask=None, state=None, positions=pos)

        def mix(h, blk=blk):
            return blk.mixer(h, positions=pos)[0]

        if placement == "res_post":
            h = x + blk.scale1 * blk.norm1(mix(x))
            want = h + blk.scale2 * blk.norm2(blk.ffn(h))
        else:
            h = x + blk.scale1 * mix(blk.norm1(x))
            want = h + blk.scale2 * blk.ffn(blk.norm2(h))
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(Block(build_config(d_model=16, n_heads=2, layer_scale=1e-5), "softmax", {}).scale1,
                       torch.full((16,), 1e-5))


def test_layer_scale_needs_a_placement_that_scales_the_branch():
    from efformer.errors import ConfigError

    with pytest.raises(ConfigError, match="layer_scale needs norm_placement"):
        build_config(d_model=16, n_heads=2, norm_placement="post", layer_scale=0.1)
