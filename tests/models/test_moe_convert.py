"""Dense-to-MoE conversion: with every expert active the converted model is the dense one; the splits
partition the neurons and recover planted structure."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.models.moe_convert import convert_to_moe, split_neurons
from efformer.nn.ffn import GLU
from efformer.registry import FFNS


def dense_lm(ffn="swiglu", **kw):
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=24, n_heads=2, n_layers=2, vocab_size=40, ffn=ffn, **kw).eval()


@pytest.mark.parametrize("method", ["random", "cluster", "coactivation"])
@pytest.mark.parametrize("ffn, n_experts", [("swiglu", 4), ("geglu", 4), ("swiglu", 5)])  # 5 leaves zero slots
def test_all_experts_active_equals_the_dense_model(method, ffn, n_experts):
    model = dense_lm(ffn)
    ids = torch.randint(0, 40, (2, 11))
    moe = convert_to_moe(model, n_experts=n_experts, method=method, calibration_ids=ids).eval()
    assert moe.cfg.ffn == "moe" and moe.cfg.ffn_options["top_k"] == n_experts
    torch.testing.assert_close(moe(ids), model(ids), atol=1e-5, rtol=1e-5)
    hidden = model.backbone.blocks[0].ffn.down.in_features  # 64 neurons regrouped (+ zero slots for 5)
    assert moe.backbone.blocks[0].ffn.w_in.numel() == 2 * 24 * n_experts * -(-hidden // n_experts)


def test_fewer_active_experts_is_a_different_but_working_model_and_it_saves(tmp_path):
    model = dense_lm()
    ids = torch.randint(0, 40, (1, 9))
    moe = convert_to_moe(model, n_experts=8, top_k=2).eval()
    assert moe.cfg.ffn_options["expert_scale"] == 8.0
    assert not torch.allclose(moe(ids), model(ids), atol=1e-4)
    efformer.save(moe, tmp_path / "m")
    assert torch.equal(efformer.load(tmp_path / "m").eval()(ids), moe(ids))


@pytest.mark.parametrize("method", ["random", "cluster", "coactivation"])
@pytest.mark.parametrize("n_experts", [4, 5])
def test_splits_partition_the_neurons(method, n_experts):
    ffn = GLU(12, 4.0)
    groups = split_neurons(ffn, n_experts, method, gate_inputs=torch.randn(50, 12))
    assert groups.shape == (n_experts, -(-32 // n_experts))
    assert sorted(i for i in groups.flatten().tolist() if i >= 0) == list(range(32))
    sizes = (groups >= 0).sum(1)
    assert int(sizes.max() - sizes.min()) <= 1


def _planted_glu(d=8, per=4, k=4) -> tuple[GLU, list[set[int]]]:
    """A GLU whose neurons come in k groups, each reading (nearly) one input direction, shuffled."""
    ffn = GLU(d, 3 * per * k / (2 * d))
    assert ffn.down.in_features == per * k
    perm = torch.randperm(per * k, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        rows = torch.zeros(per * k, d)
        for g in range(k):
            rows[g * per:(g + 1) * per, g] = 1.0
        rows += 0.05 * torch.randn(per * k, d, generator=torch.Generator().manual_seed(4))
        ffn.gate_up.weight[: per * k] = rows[perm]
    truth = [{int(j) for j in (perm == i).nonzero()} for i in range(per * k)]
    groups = [set().union(*truth[g * per:(g + 1) * per]) for g in range(k)]
    return ffn, groups


def test_clustering_and_coactivation_recover_planted_groups():
    ffn, planted = _planted_glu()
    found = {frozenset(g) for g in split_neurons(ffn, 4, "cluster").tolist()}
    assert found == {frozenset(g) for g in planted}
    # inputs each switch one direction on and the others off: the gates of one planted group open together
    x = -torch.ones(200, 8)
    x[torch.arange(200), torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))] = 1.0
    found = {frozenset(g) for g in split_neurons(ffn, 4, "coactivation", gate_inputs=x).tolist()}
    assert found == {frozenset(g) for g in planted}
    assert {frozenset(g) for g in split_neurons(ffn, 4, "random").tolist()} != {frozenset(g) for g in planted}


def test_bad_conversions_are_refused():
    model = dense_lm()
    with pytest.raises(ConfigError, match="between 1 and"):
        convert_to_moe(model, n_experts=65)
    with pytest.raises(ConfigError, match="calibration_ids"):
        convert_to_moe(model, n_experts=4, method="coactivation")
    with pytest.raises(ConfigError, match="top_k"):
        convert_to_moe(model, n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="GLU"):
        convert_to_moe(dense_lm("gelu"), n_experts=4)
    assert "swiglu" in FFNS
