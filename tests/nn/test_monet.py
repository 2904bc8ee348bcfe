"""Monet: the decomposed fast form == an independent oracle that builds every expert (i, j) and mixes them
(outputs and gradients, HD and VD, odd shapes and widths), N^2 distinct experts from 2N pieces, the two
routings, the auxiliary losses (formulas, and that the trainer adds and logs them), padding, cached
decoding, save/load and refused configs."""

from __future__ import annotations

import math

import pytest
import torch

import efformer
from efformer.errors import ConfigError
from efformer.nn.monet import Monet
from tests.helpers import (
    assert_decode_and_save_round_trip,
    assert_outputs_and_grads_close,
    aux_loss_under_router_sgd,
    outputs_and_grads,
)

D = 15  # odd: the vertical halves of d_model (8 and 7) and of the expert width differ


def make(seed=0, d=D, **opts):
    torch.manual_seed(seed)
    m = Monet(d, 4.0, options=opts)
    with torch.no_grad():  # the biases start at zero; make them count in the checks
        for name, p in m.named_parameters():
            if name.startswith(("b", "u")) and p.dim() <= 2:
                p.add_(torch.randn_like(p) * 0.3)
    return m


def oracle_expert(m, i, j):
    """Expert (i, j)'s full (U (mh, d), a, V (mh, d), b) written from the raw pieces, independently of the module."""
    n, mh, d = m.opts.n_pieces, m.m, m.d_model
    if m.opts.decompose == "horizontal":
        U = m.u.weight.reshape(n, mh, d)[i]
        a = m.u.bias.reshape(n, mh)[i]
        return U, a, m.v[j], m.b[j]
    m1, d1 = (mh + 1) // 2, (d + 1) // 2
    U = torch.cat([m.u1.weight.reshape(n, m1, d)[i], m.u2.weight.reshape(n, mh - m1, d)[j]])
    a = torch.cat([m.u1.bias.reshape(n, m1)[i], m.u2.bias.reshape(n, mh - m1)[j]])
    V = torch.zeros(mh, d)
    V[:m1, :d1], V[m1:, :d1] = m.v11[i], m.v12[i]  # output's first half: piece i reads both hidden halves
    V[:m1, d1:], V[m1:, d1:] = m.v21[j], m.v22[j]  # second half: piece j
    return U, a, V, torch.cat([m.b1[i], m.b2[j]])


def oracle(m, x, g1, g2):
    """sum over heads and every (i, j) of g1[h, i] g2[h, j] E_ij(x), token by token, x (t, d)."""
    n = m.opts.n_pieces
    out = []
    for t in range(x.shape[0]):
        y = torch.zeros(m.d_model)
        for i in range(n):
            for j in range(n):
                w = (g1[t, :, i] * g2[t, :, j]).sum()
                U, a, V, b = oracle_expert(m, i, j)
                y = y + w * (m.act(U @ x[t] + a) @ V + b)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
@pytest.mark.parametrize("routing", ["topk", "batchnorm"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7)])
def test_fast_and_reference_equal_the_materialised_experts_outputs_and_grads(decompose, routing, shape):
    m = make(n_pieces=5, n_heads=3, top_k=2, expert_dim=5, decompose=decompose, routing=routing,
             activation="silu").train()
    x = torch.randn(*shape, D)

    def materialised(xi):  # every expert (i, j) built from the raw parameters, mixed by the routing weights
        g1, g2 = m.route(xi.reshape(-1, D), torch.ones(xi.shape[0] * xi.shape[1], dtype=torch.bool))
        return oracle(m, xi.reshape(-1, D), g1, g2).reshape(x.shape)

    ref = outputs_and_grads(materialised, x, list(m.parameters()))
    for form in ("fast", "reference"):
        m.opts = m.opts.model_copy(update={"form": form})
        assert_outputs_and_grads_close(outputs_and_grads(m, x, list(m.parameters())), ref)


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
def test_n_squared_distinct_experts_from_2n_pieces(decompose):
    n = 4
    m = make(n_pieces=n, expert_dim=4, decompose=decompose)
    experts = {tuple(torch.cat([t.reshape(-1) for t in oracle_expert(m, i, j)]).tolist())
               for i in range(n) for j in range(n)}
    assert len(experts) == n * n
    for i in range(n):  # the module's own materialisation agrees with the oracle's
        for j in range(n):
            for a, b in zip(m.expert_params(i, j), oracle_expert(m, i, j), strict=True):
                assert torch.equal(a, b)
    # storage: 2N pieces of half an expert each, i.e. N experts' worth (HD: N bottoms + N tops)
    per_expert = sum(t.numel() for t in oracle_expert(m, 0, 0))
    assert sum(p.numel() for n_, p in m.named_parameters() if not n_.startswith("router")) == n * per_expert


def test_topk_routing_keeps_exactly_top_k_and_each_head_sums_to_one():
    m = make(n_pieces=7, n_heads=3, top_k=3, routing="topk")
    x = torch.randn(40, D)
    g1, g2 = m.route(x, torch.ones(40, dtype=torch.bool))
    z = m.router(x).view(40, 2, 3, 7)
    for g, zz in ((g1, z[:, 0]), (g2, z[:, 1])):
        assert ((g > 0).sum(-1) == 3).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(40, 3))
        assert torch.equal(g > 0, torch.zeros_like(g, dtype=torch.bool).scatter(-1, zz.topk(3, -1).indices, True))
        # the kept weights are the softmax of the kept logits
        kept = zz.masked_fill(g == 0, float("-inf")).softmax(-1)
        torch.testing.assert_close(g, kept)


def test_batchnorm_routing_keeps_about_top_k_and_always_the_best_piece():
    m = make(n_pieces=16, n_heads=2, top_k=4, routing="batchnorm").train()
    x = torch.randn(3000, D)
    for _ in range(30):  # converge the running statistics
        g1, _ = m.route(x, torch.ones(3000, dtype=torch.bool))
    kept = m.stats["pieces_per_head"]
    assert ((kept > 3.2) & (kept < 4.8)).all(), kept  # Phi^-1(1 - 4/16) keeps a quarter in expectation
    z = m.router(x).view(3000, 2, 2, 16)[:, 0]
    assert (g1.gather(-1, z.argmax(-1, keepdim=True)) > 0).all()
    m.eval()  # running statistics: about the same count, and a token's routing no longer depends on the batch
    g_eval, _ = m.route(x, torch.ones(3000, dtype=torch.bool))
    assert ((m.stats["pieces_per_head"] > 3.2) & (m.stats["pieces_per_head"] < 4.8)).all()
    torch.testing.assert_close(m.route(x[:5], torch.ones(5, dtype=torch.bool))[0], g_eval[:5])


@pytest.mark.parametrize("routing", ["topk", "batchnorm"])
def test_top_k_equal_to_n_keeps_every_piece(routing):
    m = make(n_pieces=5, top_k=5, routing=routing).train()
    g1, g2 = m.route(torch.randn(9, D), torch.ones(9, dtype=torch.bool))
    assert (g1 > 0).all() and (g2 > 0).all()


def test_aux_loss_formulas():
    m = make(n_pieces=4, n_heads=2, top_k=2, routing="topk", uniformity_loss_weight=1.0, ambiguity_loss_weight=1.0)
    torch.nn.init.zeros_(m.router.weight)
    m(torch.randn(1, 6, D))
    # uniform logits: the mean distribution is uniform (KL 0); the top-2 kept pieces get 1/2 each
    assert m.aux_losses["monet_uniformity"].item() == pytest.approx(0.0, abs=1e-6)
    assert m.aux_losses["monet_ambiguity"].item() == pytest.approx(0.5)
    with torch.no_grad():
        m.router.weight.normal_()
    x = torch.randn(1, 6, D)
    m(x)
    p = m.router(x[0]).view(6, 2, 2, 4).softmax(-1).mean(0)
    want = (-(p.log().mean(-1)) - math.log(4)).mean()
    assert m.aux_losses["monet_uniformity"].item() == pytest.approx(want.item(), rel=1e-5)
    assert m.aux_losses["monet_uniformity"].item() > 0


def test_aux_losses_reach_the_trainer_and_are_logged(tmp_path):
    from efformer.models import create_model
    from efformer.results import ResultsStore
    from efformer.train.config import build_run_config
    from efformer.train.data import build_datasets
    from efformer.train.trainer import Trainer
    from tests.train.conftest import tiny_run_dict

    raw = tiny_run_dict(tmp_path, steps=1, warmup_steps=0, checkpoint_every=0, batch_size=4)
    raw["model"].update({"ffn": "monet", "ffn_options": {"n_pieces": 4, "uniformity_loss_weight": 1.0}})
    cfg = build_run_config(raw)
    torch.manual_seed(0)
    model = create_model(cfg.build_model_config())
    tr, ev = build_datasets(cfg.data, model.cfg)
    trainer = Trainer(model, cfg.train, tr, ev, store=ResultsStore(cfg.results), out_dir=cfg.output_dir(),
                      run_config=cfg.model_dump())
    final = trainer.fit()
    names = {r["name"] for r in trainer.store.metrics(trainer.run_id)}
    assert {"aux_monet_uniformity", "aux_monet_ambiguity"} <= names, names
    assert "train_aux_monet_uniformity" in final


def test_uniformity_loss_gradient_spreads_the_routing():
    m = make(n_pieces=4, n_heads=1, top_k=1, routing="topk", uniformity_loss_weight=1.0, ambiguity_loss_weight=0.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0  # group 1 prefers piece 0
    x = torch.rand(1, 32, D)
    before, after = aux_loss_under_router_sgd(m, x, "monet_uniformity", steps=10)
    assert after < before


@pytest.mark.parametrize("routing", ["topk", "batchnorm"])
def test_padding_changes_nothing_real_and_gets_zero_output(routing):
    m = make(n_pieces=5, top_k=2, routing=routing).train()
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    y = m(x, mask=mask)
    mean = m.running_mean.clone()
    aux = {k: v.item() for k, v in m.aux_losses.items()}
    m.running_mean.zero_()
    m.running_var.fill_(1.0)
    y_real = m(torch.cat([x[0, 4:], x[1]])[None])  # the real tokens alone (fresh statistics each time)
    m.running_mean.zero_()
    m.running_var.fill_(1.0)
    x2 = x.clone()
    x2[0, :4] = 1e3  # garbage in the padding
    y2 = m(x2, mask=mask)
    torch.testing.assert_close(torch.cat([y[0, 4:], y[1]]), y_real[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2[mask], y[mask])
    assert (y[~mask] == 0).all() and torch.equal(m.running_mean, mean)
    assert {k: v.item() for k, v in m.aux_losses.items()} == pytest.approx(aux)


@pytest.mark.parametrize("opts", [dict(decompose="vertical"), dict(decompose="horizontal", routing="topk")])
def test_cached_decode_equals_the_full_forward_and_saves_and_loads(opts, tmp_path):
    torch.manual_seed(0)
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, ffn="monet",
                                  ffn_options={"n_pieces": 4, **opts})
    model.train()
    model(torch.randint(0, 50, (4, 16)))  # batchnorm routing: move the running statistics off their start
    model.eval()
    assert_decode_and_save_round_trip(model, torch.randint(0, 50, (2, 9)), tmp_path)


@pytest.mark.parametrize("opts, match", [
    (dict(n_pieces=3, top_k=4), "top_k=4 is larger than n_pieces=3"),
    (dict(n_pieces=0), "n_pieces"),
    (dict(expert_dim=1), "expert_dim"),
    (dict(decompose="diagonal"), "decompose"),
    (dict(n_piece=4), "unknown key"),
])
def test_bad_options_are_refused_at_config_time(opts, match):
    with pytest.raises(ConfigError, match=match):
        efformer.build_config(ffn="monet", ffn_options=opts)


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
def test_bf16_autocast_trains(decompose):
    model = efformer.create_model("lm-tiny", d_model=32, n_heads=2, vocab_size=50, ffn="monet",
                                  ffn_options={"n_pieces": 4, "decompose": decompose})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randint(0, 50, (2, 9)))
    y.float().sum().backward()
    ffn = model.backbone.blocks[0].ffn
    assert y.dtype == torch.bfloat16 and ffn.router.weight.grad.abs().sum() > 0
