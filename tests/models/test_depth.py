"""Mixture-of-Depths: capacity 1.0 is the plain block, the batched gather == a per-row loop, skipped
tokens ride the residual exactly, and the predictor path is causal and decodes from the cache."""

from __future__ import annotations

import math

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.models.depth import MoDBlock
from efformer.nn.aux import collect_aux_losses

BASE = dict(d_model=32, n_heads=2, n_layers=2, vocab_size=50)


def lm(seed=0, **kw):
    torch.manual_seed(seed)
    return efformer.create_model("lm-tiny", **{**BASE, **kw})


def mod_blocks(model):
    return [b for b in model.backbone.blocks if isinstance(b, MoDBlock)]


def randomize_routers(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in mod_blocks(model):
            blk.router.weight.copy_(torch.randn(blk.router.weight.shape, generator=g))
            for p in blk.predictor.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("positional", ["rope", "alibi", "learned"])
def test_capacity_one_straight_through_is_the_plain_model_exactly(positional):
    plain = lm(positional=positional).train()
    mod = lm(positional=positional, mod_capacity=1.0, mod_gate="straight_through").train()
    state = {k.replace("blocks.0.", "blocks.0.block.").replace("blocks.1.", "blocks.1.block."): v
             for k, v in plain.state_dict().items()}
    missing, unexpected = mod.load_state_dict(state, strict=False)
    assert not unexpected and all("router" in k or "predictor" in k for k in missing)
    randomize_routers(mod)
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :3] = False
    assert torch.equal(mod(ids), plain(ids))
    assert torch.equal(mod(ids, mask=mask)[mask], plain(ids, mask=mask)[mask])


def _reference_block(blk, x, positions_ids, scheme):
    """Per row: rank tokens by router score, run the inner block on the chosen ones alone."""
    out = x.clone()
    for i in range(x.shape[0]):
        scores = blk.router(x[i]).squeeze(-1)
        k = math.ceil(blk.capacity * x.shape[1] - 1e-9)
        chosen = sorted(sorted(range(x.shape[1]), key=lambda t: (-float(scores[t].detach()), t))[:k])
        sub = x[i, chosen][None]
        ctx = scheme.context(positions_ids[i, chosen][None], x.dtype)
        y, _ = blk.block(sub, mask=None, state=None, positions=ctx)
        r = torch.sigmoid(scores[chosen])[None, :, None]
        out[i, chosen] = (sub + r * (y - sub))[0]
    return out


@pytest.mark.parametrize("capacity, n", [(0.125, 16), (0.5, 7), (0.3, 13), (0.5, 1)])
def test_batched_routing_equals_the_per_row_loop_outputs_and_grads(capacity, n):
    model = lm(mod_capacity=capacity).train()
    randomize_routers(model)
    blk, scheme = model.backbone.blocks[0], model.backbone.pos
    x = torch.randn(3, n, 32, requires_grad=True)
    pos = torch.arange(n).expand(3, n)
    fast, _ = blk(x, mask=None, state=None, positions=scheme.context(pos, x.dtype))
    ref = _reference_block(blk, x, pos, scheme)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), [x, blk.router.weight])
    g_ref = torch.autograd.grad((ref * w).sum(), [x, blk.router.weight])
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # exactly ceil(capacity * n) tokens per row go through; the others are untouched
    chosen = blk.last_selected
    assert chosen.sum(1).tolist() == [math.ceil(capacity * n - 1e-9)] * 3
    assert torch.equal(fast[~chosen], x[~chosen])


def test_padding_is_never_chosen_and_capacity_counts_real_tokens():
    model = lm(mod_capacity=0.5).train()
    randomize_routers(model)
    blk = model.backbone.blocks[0]
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :4] = False
    model(torch.randint(1, 50, (2, 8)), mask=mask)
    assert not (blk.last_selected & ~mask).any()
    assert blk.last_selected.sum(1).tolist() == [2, 4]


def test_predictor_path_is_causal_and_cached_decoding_equals_the_full_forward():
    model = lm(mod_capacity=0.5, n_layers=3).eval()
    randomize_routers(model)
    ids = torch.randint(1, 50, (2, 12))
    full = model(ids)
    sel = torch.stack([b.last_selected for b in mod_blocks(model)])
    assert sel.any() and not sel.all()  # the predictor routes some tokens and skips others
    changed = ids.clone()
    changed[:, 7:] = torch.randint(1, 50, (2, 5))
    torch.testing.assert_close(model(changed)[:, :7], full[:, :7], atol=1e-6, rtol=1e-6)
    cache = model.new_cache(2)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=6),
                       model.generate(ids[:, :4], max_new_tokens=6, use_cache=False))


def test_top_k_training_routing_is_not_causal_which_is_why_decoding_uses_the_predictor():
    model = lm(mod_capacity=0.25).train()
    randomize_routers(model)
    ids = torch.randint(1, 50, (1, 12))
    a = model(ids)
    changed = ids.clone()
    changed[:, 6:] = (ids[:, 6:] + 7) % 49 + 1
    assert not torch.allclose(model(changed)[:, :6], a[:, :6], atol=1e-6)


def test_predictor_learns_top_k_membership_from_its_aux_loss():
    model = lm(mod_capacity=0.5, mod_predictor_weight=1.0, n_layers=1).train()
    blk = model.backbone.blocks[0]
    with torch.no_grad():
        blk.router.weight.normal_()
    opt = torch.optim.Adam(blk.predictor.parameters(), lr=3e-2)
    ids = torch.randint(1, 50, (4, 16))

    def accuracy():
        model(ids)
        pred = blk.predictor(model.backbone.embed(ids)).squeeze(-1) > 0
        collect_aux_losses(model)
        return float((pred == blk.last_selected).float().mean())

    before = accuracy()
    for _ in range(60):
        model(ids)
        loss = collect_aux_losses(model)["mod_predictor"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert accuracy() > max(0.9, before)


def test_mod_with_moe_ffn_trains_and_decodes():
    model = lm(mod_capacity=[0.5, None], ffn="moe", ffn_options=dict(n_experts=4, top_k=2)).train()
    model(torch.randint(1, 50, (2, 8)))
    assert {"mod_predictor", "moe_balance", "moe_z"} <= set(collect_aux_losses(model))
    assert isinstance(model.backbone.blocks[0], MoDBlock) and not isinstance(model.backbone.blocks[1], MoDBlock)
    model.eval()
    ids = torch.randint(1, 50, (1, 9))
    cache = model.new_cache(1)
    steps = [model(ids[:, :3], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=1e-5)


def test_mod_model_saves_and_loads(tmp_path):
    model = lm(mod_capacity=0.5).eval()
    randomize_routers(model)
    efformer.save(model, tmp_path / "m")
    ids = torch.randint(1, 50, (2, 7))
    assert torch.equal(efformer.load(tmp_path / "m").eval()(ids), model(ids))


@pytest.mark.parametrize("value, match", [(0.0, "outside"), (-0.5, "outside"), (1.5, "outside"),
                                          ([0.5], "entries but n_layers=2"), ([0.5, 0.0], "outside")])
def test_bad_capacities_are_refused_at_config_time(value, match):
    with pytest.raises(ConfigError, match=match):
        efformer.build_config(**BASE, mod_capacity=value)
