"""Attention MoE (LLaMA-MoE v2): every group chosen at weight 1 == softmax attention; the output == the
gate-weighted sum of each expert's own output projection of its heads (an independent composition);
the router learns and reports its balance; converting a trained softmax LM keeps its logits; bad configs."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.mixers.attention_moe import AttentionMoE
from efformer.models.moe_convert import convert_attention_to_moe
from efformer.nn.aux import collect_aux_losses
from tests.helpers import softmax_twin_of

D, H = 32, 4


def make(causal=True, **opts):
    torch.manual_seed(0)
    return AttentionMoE(D, H, causal=causal, options={"n_kv_heads": 2, **opts}).eval()


@pytest.mark.parametrize("n_experts", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_every_group_at_weight_one_is_softmax_attention(n_experts, causal):
    m = make(causal, n_experts=n_experts, top_k=n_experts, expert_scale=float(n_experts))
    with torch.no_grad():
        m.router.weight.zero_()  # uniform gates 1 / n_experts, times n_experts
    sm = softmax_twin_of(m, extra={"router.weight"})
    x = torch.randn(2, 11, D)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    assert torch.allclose(m(x, mask=mask)[0], sm(x, mask=mask)[0], atol=1e-6)


@pytest.mark.parametrize("top_k, normalize", [(1, False), (2, True), (3, False)])
def test_output_is_the_gated_sum_of_each_experts_own_projection(top_k, normalize):
    m = make(n_experts=4, top_k=top_k, normalize_topk=normalize)
    with torch.no_grad():
        m.router.weight.mul_(20)  # confident, varied choices
    x = torch.randn(3, 9, D)
    probs = m.router(x).softmax(-1)
    top, idx = probs.topk(top_k, -1)
    if normalize:
        top = top / top.sum(-1, keepdim=True)
    want = torch.zeros(3, 9, D)
    for e in range(4):
        twin = softmax_twin_of(m, extra={"router.weight"})
        with torch.no_grad():
            keep = torch.zeros(H * m.head_dim, dtype=torch.bool)
            keep[e * m.head_dim : (e + 1) * m.head_dim] = True  # expert e = query head e
            twin.out_proj.weight[:, ~keep] = 0
        gate = (top * (idx == e)).sum(-1, keepdim=True)
        want = want + gate * twin(x)[0]
    got = m(x)[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert len(set(idx[..., 0].flatten().tolist())) > 1  # several experts really chosen


def test_router_gets_gradient_and_balance_loss_is_the_switch_formula():
    m = make(n_experts=2, top_k=1, aux_loss_weight=0.5).train()
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    y, _ = m(x, mask=mask)
    probs = m.router(x).softmax(-1)[mask]
    f = torch.nn.functional.one_hot(probs.argmax(-1), 2).float().mean(0)
    aux = collect_aux_losses(m)["attn_moe_balance"]
    torch.testing.assert_close(aux, 0.5 * 2 * (f * probs.mean(0)).sum())
    assert int(m.stats["tokens_per_expert"].sum()) == int(mask.sum())  # padding takes no slot
    (y.square().sum() + aux).backward()
    assert float(m.router.weight.grad.abs().sum()) > 0


def test_converting_a_softmax_lm_keeps_its_logits_and_decodes_from_the_cache():
    torch.manual_seed(0)
    dense = efformer.create_model("lm-tiny", vocab_size=61, d_model=D, n_heads=H, n_layers=2,
                                  mixer_options={"n_kv_heads": 2}).eval()
    ids = torch.randint(0, 61, (2, 13))
    moe = convert_attention_to_moe(dense, n_experts=2).eval()
    assert moe.cfg.layer_mixers()[0][0] == "attention_moe"
    with torch.no_grad():
        assert torch.allclose(moe(ids), dense(ids), atol=1e-5)
        sparse = convert_attention_to_moe(dense, n_experts=4, top_k=1)
        for b in sparse.backbone.blocks:
            b.mixer.router.weight.normal_()
        sparse.eval()
        cache = sparse.new_cache(2)
        steps = torch.cat([sparse(ids[:, t : t + 1], cache=cache) for t in range(13)], 1)
        assert torch.allclose(steps, sparse(ids), atol=1e-5)
        assert not torch.allclose(sparse(ids), dense(ids), atol=1e-3)  # top-1 routing changes the model
    with pytest.raises(ConfigError, match="softmax"):
        convert_attention_to_moe(efformer.create_model("lm-tiny", mixer="performer"), 2)


@pytest.mark.parametrize("opts, field", [
    ({"n_experts": 3}, "n_experts"),
    ({"n_experts": 2, "top_k": 3}, "top_k"),
    ({"split_kv_from": 8}, "split_kv_from"),
])
def test_bad_options_are_refused_at_config_time(opts, field):
    with pytest.raises(ConfigError, match=field):
        efformer.build_config(d_model=D, n_heads=H, mixer="attention_moe", mixer_options=opts)
