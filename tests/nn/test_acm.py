"""The Adaptive Computation Module: all learners == the dense GLU, a token's output == the sum of its first
k learners, grouped dispatch == the per-token loop (outputs and gradients), the straight-through gate
(training forward == the sampled prefix, gradients == an independent composition, the budget loss
moves the mean), padding, cached decoding through the LM, conversion from a trained swiglu, bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import efformer
from efformer.errors import ConfigError
from efformer.models.moe_convert import convert_to_acm
from efformer.nn.acm import ACM
from efformer.nn.aux import collect_aux_losses
from efformer.nn.ffn import GLU

D = 16  # GLU hidden round(2 * 4 * 16 / 3) = 43: prime, so learner blocks are uneven


def make(seed=0, **opts):
    torch.manual_seed(seed)
    return ACM(D, 4.0, options=opts)


def with_form(acm, form):
    acm.opts = acm.opts.model_copy(update={"form": form})
    return acm


def learner_sum(acm, x, k):
    """Independent oracle: learner by learner, each on its own neuron block, summed (x (m, d), k (m,))."""
    out = torch.zeros_like(x)
    for i, (lo, hi) in enumerate(zip(acm.bounds, acm.bounds[1:], strict=False)):
        a = acm.act(x @ acm.w_gate[lo:hi].t()) * (x @ acm.w_up[lo:hi].t())
        out = out + (k > i).to(x.dtype)[:, None] * (a @ acm.w_down[lo:hi])
    return out


@pytest.mark.parametrize("n", [1, 3, 5])
def test_all_learners_are_the_dense_glu_with_the_same_weights(n):
    acm = make(n_learners=n, fixed_learners=n).eval()
    glu = GLU(D, 4.0).eval()
    with torch.no_grad():
        glu.gate_up.weight.copy_(torch.cat([acm.w_gate, acm.w_up]))
        glu.down.weight.copy_(acm.w_down.t())
    x = torch.randn(3, 13, D)
    assert torch.allclose(acm(x), glu(x), atol=1e-6)
    sizes = [b - a for a, b in zip(acm.bounds, acm.bounds[1:], strict=False)]
    assert sum(sizes) == 43 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 13)])
def test_grouped_equals_the_per_token_reference_and_the_learner_sum(n, shape):
    acm = make(n_learners=n, seed=n).eval()
    with torch.no_grad():
        acm.router[2].weight.mul_(30)  # spread the argmax over every count
    x = torch.randn(*shape, D)
    outs, grads = [], []
    for form in ("grouped", "reference"):
        xi = x.clone().requires_grad_(True)
        y = with_form(acm, form)(xi)
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in (acm.w_gate, acm.w_up, acm.w_down)])
        acm.zero_grad()
    k = acm.stats["learners"]
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(outs[0].reshape(-1, D), learner_sum(acm, x.reshape(-1, D), k), atol=1e-5)
    if shape == (3, 13):
        assert len(set(k.tolist())) >= 2  # the check covers mixed counts


def test_training_forward_is_the_sampled_prefix_and_its_gradients_are_the_straight_through_ones():
    acm = make(n_learners=4, temperature=0.7).train()
    x = torch.randn(2, 9, D, requires_grad=True)
    w = torch.randn(2, 9, D)
    torch.manual_seed(5)
    y = acm(x)
    (y * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in acm.parameters()]
    k = acm.stats["learners"]
    acm.zero_grad()
    x.grad = None
    # the same Gumbel draw, composed by hand: one-hot forward, soft backward, prefixes learner by learner
    torch.manual_seed(5)
    flat = x.reshape(-1, D)
    soft = F.gumbel_softmax(acm.router(flat).float(), tau=0.7)
    st = F.one_hot(soft.argmax(-1), 4).float() - soft.detach() + soft
    prefixes = torch.stack([learner_sum(acm, flat, torch.full((flat.shape[0],), j + 1)) for j in range(4)], 1)
    ref = (st[:, :, None] * prefixes).sum(1).reshape(2, 9, D)
    assert torch.equal(soft.argmax(-1) + 1, k)
    assert torch.allclose(y, learner_sum(acm, flat, k).reshape(2, 9, D), atol=1e-5)  # forward = its prefix
    (ref * w).sum().backward()
    want = [x.grad] + [p.grad for p in acm.parameters()]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert float(acm.router[0].weight.grad.abs().sum()) > 0  # the gate learns through the sample


def test_budget_loss_is_the_squared_deviation_and_moves_the_mean_fraction():
    acm = make(n_learners=4, budget=0.25, cost_loss_weight=1.0).train()
    x = torch.randn(4, 32, D)
    acm(x)
    frac = torch.tensor(acm.bounds[1:]).float() / acm.bounds[-1]
    mean = frac[acm.stats["learners"] - 1].mean()
    assert float(collect_aux_losses(acm)["acm_cost"].detach()) == pytest.approx(float((mean - 0.25) ** 2), rel=1e-5)
    acm.eval()(x)
    start = float(acm.stats["fraction"])
    opt = torch.optim.SGD(acm.router.parameters(), lr=2.0)
    for _ in range(60):
        acm.train()(x)
        loss = collect_aux_losses(acm)["acm_cost"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    acm.eval()(x)
    assert start > 0.4 and float(acm.stats["fraction"]) < 0.35  # the gate now runs fewer learners


def test_padding_takes_no_budget_and_leaves_real_outputs_alone():
    acm = make(n_learners=3).eval()
    x = torch.randn(2, 7, D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    y = acm(x, mask=mask)
    frac_masked = float(acm.stats["fraction"])
    assert torch.allclose(y[:1], acm(x[:1]), atol=1e-6)
    assert (y[1, 4:] == 0).all()  # padding runs no learner
    x2 = x.clone()
    x2[1, 4:] = 100.0  # padding content does not matter to real tokens or the budget
    y2 = acm(x2, mask=mask)
    assert torch.equal(y2[mask], y[mask]) and float(acm.stats["fraction"]) == frac_masked
    assert (acm.stats["learners"].reshape(2, 7)[~mask] == 0).all()


def test_cached_decode_equals_the_full_forward_in_the_lm():
    torch.manual_seed(0)
    model = efformer.create_model("lm-tiny", vocab_size=61, d_model=32, n_heads=4, ffn="acm",
                                  ffn_options={"n_learners": 4}).eval()
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(11)], 1)
    assert torch.allclose(full, steps, atol=1e-5)
    assert model.generate(ids[:, :3], 8, use_cache=True).tolist() == model.generate(ids[:, :3], 8,
                                                                                     use_cache=False).tolist()


def test_converting_a_trained_swiglu_keeps_the_model_with_every_learner():
    torch.manual_seed(0)
    dense = efformer.create_model("lm-tiny", vocab_size=61, d_model=32, n_heads=4).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 61, (2, 13))
    calib = torch.randint(0, 61, (4, 16))
    for kw in ({}, {"calibration_ids": calib}):
        acm = convert_to_acm(dense, 5, fixed_learners=5, **kw).eval()
        with torch.no_grad():
            assert torch.allclose(acm(ids), dense(ids), atol=1e-5)
    # importance order: the first learner alone keeps more of the dense FFN than the last-first order does
    block = dense.backbone.blocks[0].ffn
    x = torch.randn(64, 32)
    ordered = convert_to_acm(dense, 5, calibration_ids=calib).backbone.blocks[0].ffn
    with torch.no_grad():
        ref = block(x)
        err_first = (ordered.prefix(x, 1) - ref).norm()
        flipped = ACM(32, 4.0, options={"n_learners": 5})
        for name in ("w_gate", "w_up", "w_down"):
            getattr(flipped, name).copy_(getattr(ordered, name).flip(0))
        assert err_first < (flipped.prefix(x, 1) - ref).norm()


@pytest.mark.parametrize("opts, field", [
    ({"n_learners": 0}, "n_learners"),
    ({"n_learners": 3, "fixed_learners": 4}, "fixed_learners"),
    ({"budget": 0.0}, "budget"),
    ({"budget": 1.5}, "budget"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_options_are_refused_at_config_time(opts, field):
    with pytest.raises(ConfigError, match=field):
        efformer.create_model("lm-tiny", ffn="acm", ffn_options=opts)
