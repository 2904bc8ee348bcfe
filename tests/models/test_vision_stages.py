"""PiT's pooling stages and XCiT's three-branch block inside image models: each stage's tokens, the class
token's linear path and the depthwise pooling against hand computations, the block against its branches
written out, save/load, and bad configs refused with the field and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import efformer
from efformer.errors import ConfigError
from efformer.models.vision import VISION_PRESETS, XCiTBlock, build_vision_config, create_image_model
from efformer.nn.patch import PoolingMerge
from tests.helpers import rel_err


def _stage_inputs(model) -> list[torch.Tensor]:
    """Hooks that record the tokens entering the first block of every stage."""
    seen: list[torch.Tensor] = []
    for blocks in model.stages:
        blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    return seen


def _stage_outputs(model) -> list[torch.Tensor]:
    """Hooks that record the tokens leaving the last block of every stage."""
    seen: list[torch.Tensor] = []
    for blocks in model.stages:
        blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
    return seen


@pytest.mark.parametrize(("size", "sides"), [(32, [16, 8, 4]), (28, [14, 7, 4]), (18, [9, 5, 3])])
def test_pit_stages_carry_the_class_token_and_halve_the_grid(size, sides):
    torch.manual_seed(0)
    model = efformer.create_model("pit-tiny", image_size=size).eval()
    seen = _stage_inputs(model)
    assert model(torch.rand(2, 3, size, size)).shape == (2, 10)
    assert [tuple(t.shape) for t in seen] == [(2, 1 + s * s, d) for s, d in zip(sides, (32, 64, 128), strict=True)]


def test_pit_pooling_is_a_depthwise_strided_conv_and_the_class_token_goes_through_the_linear():
    """Stage i+1's input = [fc(class token), conv(grid)] of stage i's output, checked by hand (odd grid 7x7)."""
    torch.manual_seed(0)
    model = create_image_model(dict(image_size=14, patch_size=2, merge="pit", positional="learned", pooling="cls",
                                    stages=[dict(depth=1, d_model=4, n_heads=1), dict(depth=1, d_model=8, n_heads=2)]))
    ins, outs = _stage_inputs(model), _stage_outputs(model)
    model.eval()(torch.rand(1, 3, 14, 14))
    pool = model.merges[0]
    before, after = outs[0][0], ins[1][0]  # (1 + 49, 4) -> (1 + 16, 8)
    assert rel_err(pool.fc.weight @ before[0] + pool.fc.bias, after[0]) < 1e-6
    grid = before[1:].reshape(7, 7, 4)
    want = torch.zeros(4, 4, 8)
    for r in range(4):
        for c in range(4):
            for o in range(8):  # output channel o filters input channel o // 2 (2 filters per input channel)
                acc = pool.proj.bias[o].clone()
                for i in range(3):
                    for j in range(3):
                        rr, cc = 2 * r + i - 1, 2 * c + j - 1
                        if 0 <= rr < 7 and 0 <= cc < 7:
                            acc += pool.proj.weight[o, 0, i, j] * grid[rr, cc, o // 2]
                want[r, c, o] = acc
    assert rel_err(want.reshape(16, 8), after[1:]) < 1e-6
    by_conv = F.conv2d(grid.permute(2, 0, 1)[None], pool.proj.weight, pool.proj.bias, stride=2, padding=1, groups=4)
    assert rel_err(by_conv[0].permute(1, 2, 0).reshape(16, 8), after[1:]) < 1e-6


def test_pit_with_distillation_carries_both_tokens():
    torch.manual_seed(0)
    model = efformer.create_model("pit-tiny", distillation=True).eval()
    seen = _stage_inputs(model)
    cls_logits, dist_logits = model(torch.rand(2, 3, 32, 32), both_heads=True)
    assert [t.shape[1] for t in seen] == [2 + 256, 2 + 64, 2 + 16] and not torch.allclose(cls_logits, dist_logits)


def test_pit_class_token_reaches_every_stage_and_the_logits_read_it():
    """Moving the class token's parameters moves the logits, through both linear maps: its path is live."""
    torch.manual_seed(0)
    model = efformer.create_model("pit-tiny").eval()
    x = torch.rand(1, 3, 32, 32)
    y = model(x)
    model(x).sum().backward()
    assert all(m.fc.weight.grad.abs().sum() > 0 for m in model.merges)
    with torch.no_grad():
        model.extra.add_(0.5)
    assert not torch.allclose(model(x), y)


@pytest.mark.parametrize("preset", ["pit-tiny", "xcit-tiny"])
def test_pit_and_xcit_save_and_load_round_trip(tmp_path, preset):
    torch.manual_seed(0)
    model = efformer.create_model(preset, n_classes=3)
    model(torch.rand(4, 3, 32, 32))  # a training-mode pass moves XCiT's BatchNorm statistics
    model.eval()
    efformer.save(model, tmp_path / "m")
    again = efformer.load(tmp_path / "m").eval()
    x = torch.rand(2, 3, 32, 32)
    assert again.cfg == model.cfg and torch.equal(model(x), again(x))


def test_xcit_block_is_three_pre_norm_residual_branches():
    """x1 = x + g1 XCA(n1 x); x2 = x1 + g3 LPI(n3 x1) (class token untouched); out = x2 + g2 FFN(n2 x2)."""
    torch.manual_seed(0)
    model = efformer.create_model("xcit-tiny", pooling="cls").eval()
    block = model.stages[0][0]
    assert isinstance(block, XCiTBlock)
    with torch.no_grad():
        for name in ("scale1", "scale2", "scale3"):
            getattr(block, name).uniform_(0.5, 1.5)
    seen = []
    block.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw, out[0])), with_kwargs=True)
    model(torch.rand(2, 3, 32, 32))
    args, kw, got = seen[0]
    x, pos = (args[0] if args else kw["x"]), kw["positions"]
    x1 = x + block.scale1 * block.mixer(block.norm1(x), mask=None, state=None, positions=pos)[0]
    lpi = block.lpi(block.norm3(x1), pos)
    assert lpi[:, 0].abs().max() == 0 and lpi[:, 1:].abs().max() > 0
    x2 = x1 + block.scale3 * lpi
    assert rel_err(x2 + block.scale2 * block.ffn(block.norm2(x2)), got) < 1e-6


def test_lpi_makes_the_model_see_neighbours_xca_alone_does_not():
    """XCA is blind to token order: with no positions, a linear stem and mean pooling, swapping two patches
    changes the logits only when the LPI branch is on."""
    x = torch.rand(1, 3, 32, 32)
    swapped = x.clone()
    swapped[..., :4, :4], swapped[..., 28:, 28:] = x[..., 28:, 28:], x[..., :4, :4]
    moved = {}
    for lpi in (False, True):
        torch.manual_seed(0)
        model = create_image_model(dict(VISION_PRESETS["xcit-tiny"], positional="none", pooling="mean", stem="linear",
                                        stages=[dict(depth=2, d_model=32, n_heads=4, mixer="xca", lpi=lpi)]))
        model.eval()
        moved[lpi] = (model(x) - model(swapped)).abs().max().item()
    assert moved[False] < 1e-5 < moved[True]


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(stages=[dict(d_model=32, n_heads=2), dict(d_model=48, n_heads=4)]), "multiple of the last"),
    (dict(merge="patch_merge"), "pooling='cls' needs one stage"),
    (dict(mixer="swin", mixer_options={}), "takes only patch tokens"),
])
def test_bad_pit_configs_name_the_field_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        build_vision_config(VISION_PRESETS["pit-tiny"], **kwargs)


def test_pooling_merge_refuses_a_width_it_cannot_group():
    with pytest.raises(ConfigError, match="groups = input channels"):
        PoolingMerge(32, 48)


def test_lpi_needs_pre_norm():
    with pytest.raises(ConfigError, match="norm_placement='post'.*use norm_placement='pre'"):
        build_vision_config(VISION_PRESETS["xcit-tiny"], norm_placement="post")
