"""MatFormer: the largest granularity is the dense GLU, extracted Mix'n'Match submodels equal their
slice of the full model and save/load, and the trainer sums the loss over granularities."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.models.elastic import extract, step_widths, use_widths
from efformer.nn.matformer import MatFormerFFN
from efformer.registry import FFNS

BASE = dict(d_model=24, n_heads=2, n_layers=3, vocab_size=40)


def mat_lm(seed=0, **opts):
    torch.manual_seed(seed)
    return efformer.create_model("lm-tiny", **BASE, ffn="matformer", ffn_options=opts).eval()


def test_largest_granularity_is_the_dense_swiglu_with_the_same_weights():
    ffn = MatFormerFFN(24, 4.0)
    glu = FFNS.get("swiglu")(24, 4.0, 0.0)
    with torch.no_grad():
        glu.gate_up.weight.copy_(torch.cat([ffn.w_gate, ffn.w_up]))
        glu.down.weight.copy_(ffn.w_down.t())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ffn(x), glu(x), atol=1e-6, rtol=1e-6)
    ffn.width = 1.0
    torch.testing.assert_close(ffn(x), glu(x), atol=1e-6, rtol=1e-6)


def test_a_granularity_is_the_glu_of_the_first_neurons():
    ffn = MatFormerFFN(24, 4.0)
    ffn.width = 0.25
    h = ffn.hidden_of(0.25)
    assert h == 16
    x = torch.randn(3, 24)
    expected = (torch.nn.functional.silu(x @ ffn.w_gate[:h].t()) * (x @ ffn.w_up[:h].t())) @ ffn.w_down[:h]
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("widths", [1.0, 0.25, [0.125, 1.0, 0.5], [0.5, 0.5, 0.25]])
def test_extracted_submodel_equals_the_slice_and_saves_and_loads(widths, tmp_path):
    model = mat_lm()
    ids = torch.randint(0, 40, (2, 9))
    with use_widths(model, widths):
        sliced = model(ids)
    assert torch.equal(model(ids), mat_lm()(ids))  # the context restored the full width
    small = extract(model, widths).eval()
    assert torch.equal(small(ids), sliced)
    per = widths if isinstance(widths, list) else [widths] * 3
    held = [b.ffn.held for b in small.backbone.blocks]
    assert held == [round(w * 64) for w in per]
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == sum(p.numel() for p in model.parameters()) - sum(3 * 24 * (64 - h) for h in held)
    efformer.save(small, tmp_path / "s")
    back = efformer.load(tmp_path / "s").eval()
    assert torch.equal(back(ids), sliced)
    cache = back.new_cache(2)
    steps = [back(ids[:, :4], cache=cache)] + [back(ids[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), sliced, atol=1e-5, rtol=1e-5)


def test_smaller_granularities_are_different_models():
    model = mat_lm()
    ids = torch.randint(0, 40, (1, 6))
    outs = []
    for g in (0.125, 0.25, 0.5, 1.0):
        with use_widths(model, g):
            outs.append(model(ids))
    assert all(not torch.allclose(a, b) for a, b in zip(outs, outs[1:], strict=False))


def test_step_widths_joint_random_and_dense():
    assert step_widths(mat_lm(), 0) == [[g] * 3 for g in (1.0, 0.5, 0.25, 0.125)]
    rnd = mat_lm(training="random")
    a, b = step_widths(rnd, 7), step_widths(rnd, 7)
    assert a == b and a[0] == [1.0] * 3 and all(w in (0.125, 0.25, 0.5, 1.0) for w in a[1])
    assert len({tuple(step_widths(rnd, s)[1]) for s in range(20)}) > 3  # sub-networks vary by step
    assert step_widths(efformer.create_model("lm-tiny", **BASE), 0) == [None]
    assert step_widths(extract(mat_lm(), 0.5), 0) == [None]


def test_trainer_sums_the_loss_over_granularities(tmp_path):
    from efformer.train.data import collate, loss_terms
    from efformer.train.trainer import Trainer

    model = mat_lm(granularities=[0.5, 1.0]).train()
    data = [{"input_ids": torch.randint(0, 40, (10,))} for _ in range(8)]
    trainer = Trainer(model, {"steps": 1, "batch_size": 4, "clip_grad": None, "checkpoint_every": 0},
                      data, out_dir=tmp_path / "run")
    batch = collate([data[i] for i in trainer.order.indices(0, 0).tolist()], 0)
    expected, losses = 0, []
    for g in (1.0, 0.5):
        with use_widths(model, g):
            total, count, _ = loss_terms(model, batch)
        expected = expected + total / count
        losses.append(float(total.detach() / count))
    want = torch.autograd.grad(expected, [model.backbone.blocks[0].ffn.w_gate])[0]
    seen = {}
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (seen.update(g=model.backbone.blocks[0].ffn.w_gate.grad.clone()), step())
    out = trainer.train_step()
    torch.testing.assert_close(seen["g"], want, atol=1e-6, rtol=1e-5)
    assert out["loss"] == pytest.approx(losses[0], rel=1e-5)  # the logged loss is the full model's


@pytest.mark.parametrize("widths, match", [(0.3, "nested granularities"), ([0.5, 0.5], "one width per layer"),
                                           ([0.5, 0.5, 0.7], "nested granularities")])
def test_extracting_a_width_that_is_not_a_granularity_is_refused(widths, match):
    with pytest.raises(ConfigError, match=match):
        extract(mat_lm(), widths)


@pytest.mark.parametrize("opts, match", [
    (dict(granularities=[0.5, 0.25, 1.0]), "ascending"), (dict(granularities=[0.25, 0.5]), "ending at 1.0"),
    (dict(granularities=[0.0, 1.0]), r"\(0, 1\]"), (dict(layer_widths=[0.5, 0.3, 1.0]), "not one of"),
    (dict(layer_widths=[0.5]), "one width per layer"), (dict(granularities=[0.001, 0.01, 1.0]), "distinct neuron"),
])
def test_bad_matformer_options_are_refused_at_config_time(opts, match):
    with pytest.raises(ConfigError, match=match):
        efformer.build_config(**BASE, ffn="matformer", ffn_options=opts)


def test_widths_on_a_dense_model_are_refused():
    with pytest.raises(ConfigError, match="matformer"):
        extract(efformer.create_model("lm-tiny", **BASE), 0.5)
