"""Mixture of Hidden Dimensions: the grouped and masked forms == the per-token reference (outputs and
gradients, odd shapes), every sub-dimension active with a uniform router and scaling 1 == the dense GLU,
exactly top-k routed sub-dimensions per token plus the shared ones, reads and writes only the active
sub-dimensions, group fusion, the balance loss, padding, cached decoding and refused configs."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.nn.aux import collect_aux_losses
from efformer.nn.ffn import GLU
from efformer.nn.mohd import MoHD
from tests.helpers import (
    assert_decode_and_save_round_trip,
    assert_outputs_and_grads_close,
    aux_loss_under_router_sgd,
    outputs_and_grads,
)

D = 16


def make(seed=0, fuse_noise=0.0, **opts):
    torch.manual_seed(seed)
    m = MoHD(D, 4.0, options=opts)
    if fuse_noise and opts.get("group_fusion", True):
        with torch.no_grad():
            m.fusion.add_(torch.randn_like(m.fusion) * fuse_noise)
    return m


CASES = [
    dict(n_groups=4, n_shared=1, top_k=2),
    dict(n_groups=8, n_shared=0, top_k=3),
    dict(n_groups=16, n_shared=3, top_k=5, group_fusion=False),  # one-dimensional sub-dimensions
    dict(n_groups=2, n_shared=2, top_k=0),  # no router: every sub-dimension shared
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (1, 13)])
def test_grouped_and_masked_equal_the_per_token_reference_outputs_and_grads(opts, shape):
    m = make(fuse_noise=0.3, **opts).train()
    x = torch.randn(*shape, D)

    def run(form):
        m.opts = m.opts.model_copy(update={"form": form})
        return outputs_and_grads(m, x, list(m.parameters()))

    ref = run("reference")
    for form in ("grouped", "masked"):
        assert_outputs_and_grads_close(run(form), ref)


@pytest.mark.parametrize("opts", [dict(n_groups=4, n_shared=1, top_k=3), dict(n_groups=8, n_shared=0, top_k=8),
                                  dict(n_groups=4, n_shared=4, top_k=0)])
@pytest.mark.parametrize("fusion", [True, False])
def test_every_sub_dimension_active_with_uniform_router_and_scale_one_is_the_dense_glu(opts, fusion):
    m = make(activation_scale=1.0, group_fusion=fusion, **opts)
    if hasattr(m, "router"):
        torch.nn.init.zeros_(m.router.weight)
    glu = GLU(D, 4.0)
    with torch.no_grad():
        glu.gate_up.weight.copy_(m.gate_up.weight)
        glu.down.weight.copy_(m.down.weight)
    x = torch.randn(3, 5, D)
    for form in ("grouped", "masked", "reference"):
        m.opts = m.opts.model_copy(update={"form": form})
        torch.testing.assert_close(m(x), glu(x), atol=1e-6, rtol=1e-6)


def test_routing_picks_exactly_top_k_routed_groups_plus_the_shared_ones():
    m = make(n_groups=8, n_shared=2, top_k=3)
    x = torch.randn(4, 11, D)
    gates = m.route(x.reshape(-1, D), torch.ones(44, dtype=torch.bool))
    active = gates != 0
    assert active[:, :2].all() and (gates[:, :2] == 1).all()
    assert (active[:, 2:].sum(-1) == 3).all() and (m.stats["groups_per_token"] == 5).all()
    probs = m.router(x.reshape(-1, D)).softmax(-1)  # an independent top-3 of the router's softmax
    want = torch.zeros(44, 6, dtype=torch.bool).scatter(-1, probs.topk(3, -1).indices, True)
    assert torch.equal(active[:, 2:], want)
    chosen = probs * want
    torch.testing.assert_close(gates[:, 2:], 3 * chosen / chosen.sum(-1, keepdim=True))
    assert torch.equal(m.stats["tokens_per_group"], active.sum(0))


def test_only_active_sub_dimensions_are_read_and_written():
    m = make(n_groups=4, n_shared=1, top_k=1, group_fusion=False)
    x = torch.randn(1, 9, D, requires_grad=True)
    y = m(x)
    dims = (m.route(x.detach().reshape(-1, D), torch.ones(9, dtype=torch.bool)) != 0).repeat_interleave(4, -1)
    assert (y.reshape(-1, D)[~dims] == 0).all() and (y.reshape(-1, D)[dims] != 0).any()
    # the projections read a token's active input dimensions only (the router reads them all: gates fixed here)
    gates = m.route(x.detach().reshape(-1, D), torch.ones(9, dtype=torch.bool)).detach()
    for form in ("grouped", "masked", "reference"):
        m.opts = m.opts.model_copy(update={"form": form})
        y = getattr(m, f"_{form}")(x.reshape(-1, D), gates)
        for t in range(9):
            (grad,) = torch.autograd.grad(y[t].sum(), x, retain_graph=True)
            assert (grad[0, t][~dims[t]] == 0).all() and (grad[0, t][dims[t]] != 0).any()


def test_group_fusion_lets_inactive_sub_dimensions_reach_the_active_ones():
    for fusion, reaches in ((False, False), (True, True)):
        m = make(n_groups=4, n_shared=1, top_k=1, group_fusion=fusion, fuse_noise=0.5)
        x = torch.randn(1, 1, D, requires_grad=True)
        dims = (m.route(x.detach().reshape(-1, D), torch.ones(1, dtype=torch.bool)) != 0).repeat_interleave(4, -1)[0]
        (grad,) = torch.autograd.grad(m(x).sum(), x)
        assert bool((grad[0, 0][~dims] != 0).any()) == reaches


def test_default_activation_scale_is_the_inverse_active_fraction():
    m = make(n_groups=8, n_shared=1, top_k=1, group_fusion=False, form="masked")
    assert m.alpha == 4.0
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        y = m(x)
        m.alpha = 1.0
        dims = (m.route(x.reshape(-1, D), torch.ones(6, dtype=torch.bool)) != 0).repeat_interleave(2, -1)
        y1 = m(x * 4.0)  # alpha scales the read: the same as scaling the input by it
    torch.testing.assert_close(y, y1)
    assert dims.float().mean().item() == pytest.approx(0.25)


def test_balance_loss_is_present_one_at_uniform_routing_and_pushes_toward_balance():
    m = make(n_groups=8, n_shared=4, top_k=1, aux_loss_weight=1.0)
    torch.nn.init.zeros_(m.router.weight)
    m(torch.randn(1, 8, D))
    assert m.aux_losses["moe_balance"].item() == pytest.approx(1.0)
    with torch.no_grad():
        m.router.weight[0] = 1.0  # everything prefers routed group 0
    x = torch.rand(1, 32, D)
    before, after = aux_loss_under_router_sgd(m, x, "moe_balance", steps=8)
    assert after < before


def test_padding_takes_no_sub_dimension_and_changes_nothing_real():
    m = make(n_groups=4, n_shared=1, top_k=2, fuse_noise=0.3).train()
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    y = m(x, mask=mask)
    stats, aux = dict(m.stats), m.aux_losses["moe_balance"].item()
    assert (y[~mask] == 0).all() and (stats["groups_per_token"].reshape(2, 9)[~mask] == 0).all()
    y_real = m(torch.cat([x[0, 4:], x[1]])[None])
    torch.testing.assert_close(torch.cat([y[0, 4:], y[1]]), y_real[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(stats["tokens_per_group"], m.stats["tokens_per_group"])
    assert m.aux_losses["moe_balance"].item() == pytest.approx(aux)
    x2 = x.clone()
    x2[0, :4] = 1e3
    torch.testing.assert_close(m(x2, mask=mask)[mask], y[mask])


def test_cached_decode_equals_the_full_forward_and_aux_losses_reach_the_model(tmp_path):
    torch.manual_seed(0)
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, n_layers=2, ffn="mohd",
                                  ffn_options={"n_groups": 8, "n_shared": 2, "top_k": 2})
    model(torch.randint(0, 50, (2, 6)))
    assert set(collect_aux_losses(model)) == {"moe_balance"}
    model.eval()
    assert_decode_and_save_round_trip(model, torch.randint(0, 50, (2, 9)), tmp_path)


@pytest.mark.parametrize("opts, match", [
    (dict(n_groups=5), "n_groups=5 is invalid: must divide d_model=128"),
    (dict(n_groups=4, n_shared=2, top_k=3), "is more than n_groups=4"),
    (dict(n_shared=0, top_k=0), "no sub-dimension"),
    (dict(activation_scale=0.0), "activation_scale"),
    (dict(n_group=4), "unknown key"),
])
def test_bad_options_are_refused_at_config_time(opts, match):
    with pytest.raises(ConfigError, match=match):
        efformer.build_config(ffn="mohd", ffn_options=opts)


@pytest.mark.parametrize("form", ["grouped", "masked", "reference"])
def test_bf16_autocast_trains(form):
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, ffn="mohd",
                                  ffn_options={"form": form})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randint(0, 50, (2, 9)))
    y.float().sum().backward()
    ffn = model.backbone.blocks[0].ffn
    assert y.dtype == torch.bfloat16 and ffn.gate_up.weight.grad.abs().sum() > 0 and ffn.router.weight.grad is not None
