"""The MoE FFN: batched dispatch == the per-token loop, exact limits, capacity accounting, padding,
cached decoding through the LM, and refused configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import efformer
from efformer.errors import CapabilityError, ConfigError
from efformer.nn.aux import collect_aux_losses
from efformer.nn.moe import MoE, load_balance
from tests.helpers import aux_loss_under_router_sgd


def make(d=16, causal=False, seed=0, **opts):
    torch.manual_seed(seed)
    return MoE(d, 4.0, options=opts, causal=causal)


def with_form(moe, form):
    moe.opts = moe.opts.model_copy(update={"form": form})
    return moe


def run_forms(moe, x, mask=None, forms=("batched", "grouped", "reference")):
    """Outputs and grads (input, then every parameter) of each form, for the same weights and input."""
    outs, grads = [], []
    for form in forms:
        with_form(moe, form)
        xi = x.clone().requires_grad_(True)
        y = moe(xi, mask=mask)
        w = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
    return outs, grads


CASES = [
    dict(n_experts=4, top_k=2),
    dict(n_experts=5, top_k=1, capacity_factor=0.7),
    dict(n_experts=4, top_k=3, normalize_topk=True, n_shared=1),
    dict(n_experts=6, top_k=2, bigmac_dim=8),
    dict(n_experts=16, top_k=4, expert_hidden=5),  # fine-grained: many narrow experts
    dict(n_experts=4, routing="expert", capacity_factor=1.3),
    dict(n_experts=3, routing="expert", capacity_factor=0.5),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 13)])
def test_batched_and_grouped_equal_the_per_token_reference_outputs_and_grads(opts, shape):
    moe = make(**opts).train()
    x = torch.randn(*shape, 16)
    outs, grads = run_forms(moe, x)
    for y, g in zip(outs[:2], grads[:2], strict=True):
        torch.testing.assert_close(y, outs[2], atol=1e-5, rtol=1e-5)
        for a, b in zip(g, grads[2], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", CASES[:2] + CASES[5:6], ids=["topk", "capacity", "expert"])
def test_padding_takes_no_capacity_and_changes_no_real_output(opts):
    moe = make(**opts).train()
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False  # left padding in row 0
    y = moe(x, mask=mask)
    stats = dict(moe.stats)
    # the same real tokens alone (row 0 without its padding, row 1) give the same outputs and counts
    x_real = torch.cat([x[0, 4:], x[1]])[None]
    y_real = moe(x_real)
    torch.testing.assert_close(torch.cat([y[0, 4:], y[1]]), y_real[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(stats["tokens_per_expert"], moe.stats["tokens_per_expert"])
    assert int(stats["dropped"]) == int(moe.stats["dropped"])
    x2 = x.clone()
    x2[0, :4] = torch.randn(4, 16) * 100  # garbage in the padding changes nothing real
    torch.testing.assert_close(moe(x2, mask=mask)[mask], y[mask])
    outs, _ = run_forms(moe, x, mask)
    for y in outs[:2]:
        torch.testing.assert_close(y[mask], outs[2][mask], atol=1e-5, rtol=1e-5)


def test_all_experts_with_uniform_router_is_the_dense_average():
    moe = make(n_experts=4, top_k=4)
    torch.nn.init.zeros_(moe.router.weight)
    x = torch.randn(2, 5, 16)
    dense = sum(moe.expert(e, x.reshape(-1, 16)) for e in range(4)) / 4
    torch.testing.assert_close(moe(x), dense.reshape(2, 5, 16), atol=1e-6, rtol=1e-6)


def test_one_expert_top1_is_the_dense_glu_with_the_same_weights():
    ffn = efformer.registry.FFNS.get("swiglu")(16, 4.0, 0.0)
    moe = make(n_experts=1, top_k=1, expert_hidden=ffn.down.in_features)
    with torch.no_grad():
        moe.w_in.copy_(ffn.gate_up.weight.t()[None])
        moe.w_out.copy_(ffn.down.weight.t()[None])
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-6, rtol=1e-6)


def test_infinite_capacity_drops_nothing_and_finite_drops_exactly_the_overflow():
    moe = make(n_experts=4, top_k=2).train()
    x = torch.randn(2, 11, 16)
    moe(x)
    assert int(moe.stats["dropped"]) == 0 and int(moe.stats["tokens_per_expert"].sum()) == 44
    # the overflow from the counts without a limit, computed independently
    choice = moe.router(x.reshape(-1, 16)).softmax(-1).topk(2, -1).indices
    for factor in (0.5, 0.8, 1.0, 1.5):
        moe.opts = moe.opts.model_copy(update={"capacity_factor": factor})
        cap = math.ceil(factor * 22 * 2 / 4)
        counts = torch.bincount(choice.reshape(-1), minlength=4)
        moe(x)
        assert int(moe.stats["dropped"]) == int((counts - cap).clamp(min=0).sum())
        assert int(moe.stats["tokens_per_expert"].max()) <= cap
        # first choices win slots over second choices: no first choice is dropped while capacity allows
        first = torch.bincount(choice[:, 0], minlength=4)
        assert int(moe.stats["dropped"]) >= int((first - cap).clamp(min=0).sum())
    moe.eval()  # evaluation routes every token, so decoding does not depend on the batch
    moe(x)
    assert int(moe.stats["dropped"]) == 0


def test_expert_choice_gives_every_expert_exactly_its_capacity():
    for factor, n in [(1.0, 12), (0.5, 7), (2.0, 9)]:
        moe = make(n_experts=4, routing="expert", capacity_factor=factor)
        moe(torch.randn(1, n, 16))
        cap = math.ceil(factor * n / 4)
        assert moe.stats["tokens_per_expert"].tolist() == [min(cap, n)] * 4
        assert load_balance(moe.stats) == 1.0


def test_balance_loss_is_one_at_uniform_routing_and_z_loss_matches_its_formula():
    moe = make(n_experts=4, top_k=1, aux_loss_weight=1.0, z_loss_weight=1.0)
    torch.nn.init.zeros_(moe.router.weight)
    x = torch.randn(1, 8, 16)
    moe(x)
    # uniform probs: P_e = 1/4 whatever f is, so the loss is 4 * sum(f)/4 = 1
    assert moe.aux_losses["moe_balance"].item() == pytest.approx(1.0)
    assert moe.aux_losses["moe_z"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    moe = make(n_experts=4, top_k=2, z_loss_weight=0.5)
    moe(x)
    z = torch.logsumexp(moe.router(x[0]), -1).square().mean() * 0.5
    assert moe.aux_losses["moe_z"].item() == pytest.approx(z.item(), rel=1e-5)


def test_balance_loss_gradient_pushes_the_router_toward_balance():
    moe = make(n_experts=4, top_k=1, aux_loss_weight=1.0, z_loss_weight=0.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # everything prefers expert 0
    x = torch.rand(1, 32, 16)
    before, after = aux_loss_under_router_sgd(moe, x, "moe_balance", steps=8)
    assert after < before


def test_shared_experts_are_always_on_and_active_params_match_dense():
    dense_hidden = round(2 * 4.0 * 16 / 3)
    moe = make(n_experts=8, top_k=2, n_shared=2)
    assert moe.hidden == round(dense_hidden / 4)
    torch.nn.init.zeros_(moe.w_out)  # routed experts silent: only the shared part remains
    x = torch.randn(2, 3, 16)
    g, u = moe.shared_in(x).chunk(2, -1)
    torch.testing.assert_close(moe(x), moe.shared_out(F.silu(g) * u))


def test_bigmac_experts_work_in_the_small_dimension():
    moe = make(n_experts=4, top_k=2, bigmac_dim=4)
    assert moe.w_in.shape == (4, 4, 2 * moe.hidden) and moe.descend.out_features == 4


@pytest.mark.parametrize("opts", [dict(n_experts=4, top_k=2, capacity_factor=0.5), dict(n_experts=4, top_k=1,
                                                                                        n_shared=1)])
def test_cached_decoding_equals_the_full_forward_through_the_lm(opts):
    torch.manual_seed(0)
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, ffn="moe", ffn_options=opts).eval()
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids)
    cache = model.new_cache(2)
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    out = model.generate(ids[:, :3], max_new_tokens=5)
    assert torch.equal(out, model.generate(ids[:, :3], max_new_tokens=5, use_cache=False))


def test_model_collects_aux_losses_after_forward_and_clears_them():
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, n_layers=3, ffn="moe",
                                  ffn_options=dict(n_experts=4, top_k=2))
    model(torch.randint(0, 50, (2, 6)))
    per_layer = [blk.ffn.aux_losses["moe_balance"] for blk in model.backbone.blocks]
    aux = collect_aux_losses(model)
    assert set(aux) == {"moe_balance", "moe_z"}
    assert float(aux["moe_balance"]) == pytest.approx(float(sum(per_layer)))
    assert collect_aux_losses(model) == {}


def test_moe_model_saves_and_loads(tmp_path):
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, ffn="moe",
                                  ffn_options=dict(n_experts=4, top_k=2, n_shared=1)).eval()
    efformer.save(model, tmp_path / "m")
    back = efformer.load(tmp_path / "m").eval()
    ids = torch.randint(0, 50, (1, 7))
    assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("opts, match", [
    (dict(n_experts=2, top_k=3), "top_k=3 is larger than n_experts=2"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(n_experts=0), "n_experts"),
    (dict(n_expert=4), "unknown key"),
])
def test_bad_options_are_refused_at_config_time(opts, match):
    with pytest.raises(ConfigError, match=match):
        efformer.build_config(ffn="moe", ffn_options=opts)


def test_expert_choice_in_a_causal_model_is_refused_unless_allowed():
    with pytest.raises(CapabilityError, match="later tokens"):
        efformer.build_config(ffn="moe", ffn_options=dict(routing="expert"))
    efformer.build_config(ffn="moe", ffn_options=dict(routing="expert", allow_future_routing=True))
    efformer.build_config(task="classifier", ffn="moe", ffn_options=dict(routing="expert"))


def test_options_on_an_ffn_without_options_are_refused():
    with pytest.raises(ConfigError, match="takes no options"):
        efformer.build_config(ffn="swiglu", ffn_options=dict(n_experts=4))


@pytest.mark.parametrize("form", ["batched", "grouped"])
def test_bf16_autocast_trains(form):
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, ffn="moe",
                                  ffn_options=dict(n_experts=4, top_k=2, form=form, n_shared=1, bigmac_dim=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randint(0, 50, (2, 9)))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and model.backbone.blocks[0].ffn.w_in.grad.abs().sum() > 0


def test_deepnorm_scales_expert_weights_but_not_the_router():
    from efformer.models.block import deepnorm_constants

    def build(placement):
        torch.manual_seed(0)
        return efformer.create_model("lm-tiny", d_model=32, n_heads=2, n_layers=3, norm_placement=placement,
                                     ffn="moe", ffn_options=dict(n_experts=4, top_k=2, n_shared=1))

    plain, deep = build("post").backbone.blocks[0].ffn, build("deepnorm").backbone.blocks[0].ffn
    beta = deepnorm_constants(3)[1]
    torch.testing.assert_close(deep.w_in, plain.w_in * beta)
    torch.testing.assert_close(deep.shared_out.weight, plain.shared_out.weight * beta)
    assert torch.equal(deep.router.weight, plain.router.weight)


def _pregated_lm(**kw):
    torch.manual_seed(0)
    opts = dict(n_experts=4, top_k=2, pregated=True, **kw)
    return efformer.create_model("lm-tiny", d_model=32, n_heads=2, n_layers=3, vocab_size=50, ffn="moe",
                                 ffn_options=opts).eval()


def test_pregated_layers_route_with_the_previous_layers_input():
    model = _pregated_lm()
    ffns = [b.ffn for b in model.backbone.blocks]
    inputs, outputs = {}, {}

    def keep(i):
        def hook(module, args, kwargs, out):
            inputs[i], outputs[i] = args[0], out
        return hook

    for i, f in enumerate(ffns):
        f.register_forward_hook(keep(i), with_kwargs=True)
    model(torch.randint(0, 50, (2, 7)))
    for i, f in enumerate(ffns):  # by hand: layer i's router on layer i-1's FFN input (layer 0 on its own)
        x = inputs[i].reshape(-1, 32)
        source = inputs[max(i - 1, 0)].reshape(-1, 32)
        top = f.router(source).softmax(-1).topk(2, -1)
        want = torch.stack([sum(top.values[t, j] * f.expert(int(top.indices[t, j]), x[t : t + 1])[0]
                                for j in range(2)) for t in range(x.shape[0])])
        torch.testing.assert_close(outputs[i].reshape(-1, 32), want, atol=1e-5, rtol=1e-5)


def test_pregated_plans_reach_the_hook_one_layer_ahead_and_decoding_matches():
    model = _pregated_lm()
    ffns = [b.ffn for b in model.backbone.blocks]
    events = []
    for i, f in enumerate(ffns):
        f.on_plan = lambda m, ids, i=i: events.append(("plan", i, sorted(ids.tolist())))
        f.register_forward_pre_hook(lambda m, a, i=i: events.append(("run", i)))
    ids = torch.randint(0, 50, (1, 1))
    model(ids)
    # layer 0 plans itself, then while running it plans layer 1; layer 1 plans layer 2
    assert [e[:2] for e in events] == [("run", 0), ("plan", 0), ("plan", 1), ("run", 1), ("plan", 2), ("run", 2)]
    used = [sorted(torch.nonzero(f.stats["tokens_per_expert"]).flatten().tolist()) for f in ffns]
    assert [e[2] for e in events if e[0] == "plan"] == used
    ids = torch.randint(0, 50, (2, 8))
    full = model(ids)
    cache = model.new_cache(2)
    steps = [model(ids[:, :3], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_pregated_refuses_expert_choice_and_mixture_of_depths():
    with pytest.raises(ConfigError, match="pregated"):
        efformer.build_config(ffn="moe", ffn_options=dict(pregated=True, routing="expert", allow_future_routing=True))
    with pytest.raises(ConfigError, match="Mixture-of-Depths"):
        efformer.build_config(ffn="moe", ffn_options=dict(pregated=True), mod_capacity=0.5)


@pytest.mark.parametrize("ffn, opts", [("moe", dict(n_experts=4, top_k=2, pregated=True)), ("mohd", {}),
                                       ("monet", dict(n_pieces=4))])
def test_a_conditional_ffn_in_a_model_whose_mixer_list_length_mismatches_is_refused(ffn, opts):
    with pytest.raises(ConfigError, match=r"mixer list has 2 entries but n_layers=3; give one mixer per layer"):
        efformer.build_config(ffn=ffn, ffn_options=opts, mixer=["softmax", "local"], n_layers=3)
    with pytest.raises(ConfigError, match="mixer_options has 1 entries but mixer has 2"):
        efformer.build_config(ffn=ffn, ffn_options=opts, mixer=["softmax", "local"], mixer_options=[{}], n_layers=2)
    # matching lengths build, and every layer gets its own conditional FFN
    model = efformer.create_model("lm-tiny", ffn=ffn, ffn_options=opts, mixer=["softmax", "local"], n_layers=2,
                                  d_model=32, n_heads=2, vocab_size=50)
    model(torch.randint(0, 50, (1, 5)))
    assert len(collect_aux_losses(model)) >= 1
    assert len({id(b.ffn) for b in model.backbone.blocks}) == 2
