"""Pruning surgery: nothing pruned = identical model; zero-output units removed = same outputs; smaller
weights that save, load and generate; bad plans refused with the input untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import efformer
from efformer.compress.prune import GQAError, PrunePlan, apply_plan, count_params, flops_per_token
from efformer.errors import CapabilityError, ConfigError


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=3, n_heads=4, max_len=64, mixer_options={"n_kv_heads": 2}, ffn_mult=3.0)
    return efformer.create_model("lm-tiny", **{**cfg, **kw}).double().eval()


X = torch.randint(1, 256, (2, 13))


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_empty_plan_is_identical():
    m = tiny()
    p = apply_plan(m, PrunePlan())
    assert p is not m and p.cfg == m.cfg and _same_state(p, m)
    assert torch.equal(p(X), m(X))


def _zero_units(m, layer_heads=(), layer_neurons=()):
    with torch.no_grad():
        for layer, heads in layer_heads:
            mix = m.backbone.blocks[layer].mixer
            for h in heads:
                mix.out_proj.weight[:, h * mix.head_dim:(h + 1) * mix.head_dim] = 0
        for layer, neurons in layer_neurons:
            m.backbone.blocks[layer].ffn.down.weight[:, neurons] = 0


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_removing_zero_output_units_keeps_outputs(placement):
    m = tiny(norm_placement=placement)
    _zero_units(m, [(0, [2, 3]), (2, [0, 1])], [(1, [0, 5, 7]), (2, [60])])
    plan = PrunePlan(heads={0: [2, 3], 2: [0, 1]}, neurons={1: [0, 5, 7], 2: [60]})
    p = apply_plan(m, plan)
    assert p.cfg.layer_heads == [2, 4, 2] and p.cfg.layer_ffn_hidden == [64, 61, 63]
    assert [o["n_kv_heads"] for o in p.cfg.mixer_options] == [1, 2, 1]
    assert p.backbone.blocks[0].mixer.kv_proj.weight.shape == (2 * 8, 32)  # the KV cache shrinks too
    # the removed terms are exact zeros; only the summation order of the smaller matmuls differs
    assert (p(X) - m(X)).abs().max() < 1e-12
    assert count_params(p) < count_params(m) and flops_per_token(p) < flops_per_token(m)


def test_removing_zero_neurons_is_bit_exact_on_integers():
    """With integer weights and inputs every sum is exact, so any order gives the same bits."""
    torch.manual_seed(0)
    m = efformer.create_model("lm-tiny", d_model=16, n_layers=1, n_heads=2, ffn="relu", max_len=32).double()
    ffn = m.backbone.blocks[0].ffn
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randint(-3, 4, p.shape).double())
        ffn.down.weight[:, [1, 4, 9]] = 0
    x = torch.randint(-5, 6, (3, 7, 16)).double()
    p = apply_plan(m, PrunePlan(neurons={0: [1, 4, 9]}))
    assert torch.equal(p.backbone.blocks[0].ffn(x), ffn(x))


def test_glu_gate_and_up_rows_removed_together():
    m = tiny()
    p = apply_plan(m, PrunePlan(neurons={0: [3]}))
    old, new = m.backbone.blocks[0].ffn.gate_up.weight, p.backbone.blocks[0].ffn.gate_up.weight
    h = old.shape[0] // 2
    keep = [i for i in range(h) if i != 3]
    assert torch.equal(new, torch.cat([old[keep], old[[h + i for i in keep]]]))
    assert torch.equal(p.backbone.blocks[0].ffn.down.weight, m.backbone.blocks[0].ffn.down.weight[:, keep])


def test_depth_pruning_renumbers_blocks():
    m = tiny()
    p = apply_plan(m, PrunePlan(blocks=[1]))
    assert p.cfg.n_layers == 2
    assert torch.equal(p.backbone.blocks[1].ffn.down.weight, m.backbone.blocks[2].ffn.down.weight)


def test_pruned_model_saves_loads_generates(tmp_path):
    m = tiny()
    p = apply_plan(m, PrunePlan(heads={1: [0, 1]}, neurons={0: list(range(10))}, blocks=[2]))
    efformer.save(p, tmp_path / "p")
    q = efformer.load(tmp_path / "p").double().eval()
    assert q.cfg == p.cfg and _same_state(p, q)
    assert torch.equal(q(X), p(X))
    prompt = X[:, :4]
    assert torch.equal(q.generate(prompt, 6), p.generate(prompt, 6))
    # cached decode == recomputation on the pruned shapes
    assert torch.equal(p.generate(prompt, 6), p.generate(prompt, 6, use_cache=False))


def test_multi_head_attention_and_classifier():
    torch.manual_seed(0)
    c = efformer.create_model("classifier-tiny", d_model=32, n_heads=4).double().eval()
    _zero_units(c, [(0, [1])])
    p = apply_plan(c, PrunePlan(heads={0: [1]}))
    assert p.cfg.layer_heads == [3, 4] and (p(X) - c(X)).abs().max() < 1e-12


@pytest.mark.parametrize("plan,error,message", [
    (PrunePlan(heads={0: [2]}), GQAError, "whole key/value groups"),
    (PrunePlan(heads={0: [0, 1, 2, 3]}), ConfigError, "keep at least one"),
    (PrunePlan(neurons={1: list(range(64))}), ConfigError, "keep at least one"),
    (PrunePlan(neurons={5: [0]}), ConfigError, "layer index"),
    (PrunePlan(neurons={0: [999]}), ConfigError, "indices in [0, 63]"),
    (PrunePlan(blocks=[0, 1, 2]), ConfigError, "keep at least one"),
])
def test_bad_plans_refused_input_untouched(plan, error, message):
    m = tiny()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        apply_plan(m, plan)
    assert m.cfg.layer_heads is None and m.cfg.layer_ffn_hidden is None and m.cfg.n_layers == 3
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_unsupported_models_refused():
    torch.manual_seed(0)
    alibi = efformer.create_model("lm-tiny", d_model=32, positional="alibi")
    with pytest.raises(CapabilityError, match="score bias per head"):
        apply_plan(alibi, PrunePlan(heads={0: [0]}))
    exits = efformer.create_model("lm-tiny", d_model=32, n_layers=3, exit_layers=[0])
    with pytest.raises(CapabilityError, match="early-exit"):
        apply_plan(exits, PrunePlan(blocks=[1]))


def test_config_refuses_bad_layer_fields():
    with pytest.raises(ConfigError, match="head_dim"):
        efformer.create_model("lm-tiny", layer_heads=[2, 4])
    with pytest.raises(ConfigError, match="one positive integer per layer"):
        efformer.create_model("lm-tiny", layer_ffn_hidden=[10])


def test_hf_imported_model(tmp_path):
    """An imported Qwen2 (GQA, q/k/v biases): zero-output KV group and neurons removed, outputs kept, saved."""
    from tests.interop import hf_models as hm

    m = efformer.from_hf(hm.save(hm.qwen2(), tmp_path / "hf")).double().eval()
    x = torch.randint(1, hm.VOCAB, (2, 9))
    _zero_units(m, [(1, [0, 1])], [(0, [3, 50])])
    p = apply_plan(m, PrunePlan(heads={1: [0, 1]}, neurons={0: [3, 50]}))
    assert p.backbone.blocks[1].mixer.kv_proj.bias.shape == (2 * 8,)
    assert (p(x) - m(x)).abs().max() < 1e-12
    efformer.save(p, tmp_path / "p")
    assert torch.equal(efformer.load(tmp_path / "p").double()(x), p(x))
