"""Patch embeddings, merging and 2-D positions: each checked against its plain definition."""

from __future__ import annotations

import pytest
import torch

from efformer.errors import ConfigError, ShapeError
from efformer.nn.patch import ConditionalPosition, PatchEmbed, PatchMerge, resize_table, rope_2d, sincos_2d


def test_linear_patch_embedding_is_one_linear_map_per_flattened_patch():
    pe = PatchEmbed(3, 16, 4)
    img = torch.randn(2, 3, 8, 12)
    out = pe(img)
    assert out.shape == (2, 2, 3, 16)
    patch = img[:, :, 4:8, 8:12].reshape(2, -1)  # patch (1, 2), flattened (channel, dy, dx)
    want = patch @ pe.proj.weight.reshape(16, -1).T + pe.proj.bias
    assert torch.allclose(out[:, 1, 2], want, atol=1e-5)


def test_conv_stem_halves_log2_p_times_and_refuses_other_patch_sizes():
    assert PatchEmbed(1, 32, 8, "conv")(torch.randn(1, 1, 32, 32)).shape == (1, 4, 4, 32)
    assert PatchEmbed(1, 32, 1, "conv")(torch.randn(1, 1, 5, 5)).shape == (1, 5, 5, 32)
    with pytest.raises(ConfigError, match="power of 2"):
        PatchEmbed(3, 32, 6, "conv")


@pytest.mark.parametrize(("shape", "words"), [((2, 1, 8, 8), "1 channels but the model takes in_channels=3"),
                                              ((2, 3, 8, 10), "not a multiple of the patch size 4"),
                                              ((3, 8, 8), "batch, channels, height, width")])
def test_bad_images_are_refused_by_name(shape, words):
    with pytest.raises(ShapeError, match=words):
        PatchEmbed(3, 16, 4)(torch.randn(shape))
    with pytest.raises(ShapeError, match="floating point"):
        PatchEmbed(3, 16, 4)(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_swin_patch_merge_concatenates_each_2x2_block_and_pads_odd_grids():
    pm = PatchMerge(2, 3)
    with torch.no_grad():
        pm.norm.weight.fill_(1.0)
        pm.norm.bias.zero_()
    g = torch.randn(1, 5, 3, 2)
    out = pm(g)
    assert out.shape == (1, 3, 2, 3)
    block = torch.cat([g[0, 2, 0], g[0, 3, 0], g[0, 2, 1], g[0, 3, 1]])
    assert torch.allclose(out[0, 1, 0], pm.proj(pm.norm(block)), atol=1e-6)
    assert PatchMerge(2, 3, "conv")(g).shape == (1, 3, 2, 3)


def test_sincos_positions_are_distinct_bounded_and_separable():
    p = sincos_2d(4, 6, 16)
    assert p.shape == (24, 16) and p.abs().max() <= 1
    assert torch.cdist(p, p).fill_diagonal_(1).min() > 1e-3
    assert torch.equal(p[0, :8], p[5, :8]) and torch.equal(p[0, 8:], p[18, 8:])  # same row / same column halves
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_2d(2, 2, 6)


def test_rope_2d_scores_depend_only_on_the_2d_offset():
    h = w = 6
    rot = rope_2d(h, w, 1, 16, 1, torch.float64)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    qs = rot.queries(q.expand(1, 1, 37, 16))[0, 0]
    ks = rot.keys(k.expand(1, 1, 37, 16))[0, 0]

    def tok(r, c):
        return 1 + r * w + c

    s1 = qs[tok(1, 2)] @ ks[tok(3, 1)]
    s2 = qs[tok(2, 4)] @ ks[tok(4, 3)]  # same (row, col) offset, elsewhere
    s3 = qs[tok(1, 2)] @ ks[tok(1, 4)]  # another offset
    assert torch.allclose(s1, s2) and not torch.allclose(s1, s3)
    assert torch.allclose(qs[0], q)  # the class token sits at (0, 0): not rotated


def test_learned_table_resize_is_identity_at_its_size_and_smooth_elsewhere():
    t = torch.randn(16, 8)
    assert resize_table(t, 4, 4, 4, 4) is t
    assert resize_table(t, 4, 4, 8, 6).shape == (48, 8)


def test_cpe_adds_a_depthwise_conv_of_the_grid():
    cpe = ConditionalPosition(4)
    g = torch.randn(1, 5, 5, 4)
    with torch.no_grad():
        cpe.conv.weight.zero_()
        cpe.conv.bias.zero_()
    assert torch.equal(cpe(g), g)
    with torch.no_grad():
        cpe.conv.weight[:, :, 1, 2] = 1.0  # picks the right neighbour, zero past the border
    out = cpe(g)
    assert torch.allclose(out[0, 2, 1], g[0, 2, 1] + g[0, 2, 2]) and torch.allclose(out[0, 2, 4], g[0, 2, 4])


def test_mix_ffn_is_a_depthwise_3x3_conv_between_its_linear_maps():
    from efformer.nn.patch import MixFFN
    from efformer.nn.positional import PositionalContext

    torch.manual_seed(0)
    ffn = MixFFN(8, 2.0, options={"relu": True})
    x, (h, w) = torch.randn(2, 15, 8), (3, 5)
    got = ffn(x, positions=PositionalContext(torch.arange(15).expand(2, -1), grid=(h, w)))
    up = torch.relu(ffn.up(x)).reshape(2, h, w, -1)
    padded = torch.nn.functional.pad(up, (0, 0, 1, 1, 1, 1))
    conv = sum(padded[:, dy:dy + h, dx:dx + w] * ffn.dwconv.weight[:, 0, dy, dx] for dy in range(3) for dx in range(3))
    want = ffn.down(torch.nn.functional.gelu(conv + ffn.dwconv.bias).reshape(2, 15, -1))
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ShapeError, match="mixffn convolves the token grid"):
        ffn(x)


def test_v2_and_overlapping_conv_merges():
    g = torch.randn(2, 5, 7, 6)
    v1, v2 = PatchMerge(6, 10, "patch_merge"), PatchMerge(6, 10, "patch_merge_v2")
    v2.proj.weight.data.copy_(v1.proj.weight.data)
    padded = torch.nn.functional.pad(g, (0, 0, 0, 1, 0, 1))
    cat = torch.cat([padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2], padded[:, 1::2, 1::2]], -1)
    assert torch.allclose(v2(g), v2.norm(cat @ v1.proj.weight.T), atol=1e-6)  # V2: linear map, then LayerNorm
    m = PatchMerge(6, 10, "conv", kernel=3, norm=False, pre_norm=True)
    want = m.proj(m.pre_norm(g).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # 3x3, stride 2, padding 1: ceil(h / 2)
    assert m(g).shape == (2, 3, 4, 10) and torch.allclose(m(g), want, atol=1e-6)


def test_overlapping_patch_stem_keeps_the_grid_and_normalises():
    e = PatchEmbed(3, 8, 4, kernel=7, padding=3, norm=True)
    x = torch.randn(1, 3, 16, 20)
    assert e(x).shape == (1, 4, 5, 8)
    assert torch.allclose(e(x), e.norm(e.proj(x).permute(0, 2, 3, 1)), atol=1e-6)
