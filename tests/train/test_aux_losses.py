"""Auxiliary losses (MoE balance and z-loss) reach the trainer's gradient and the results store."""

from __future__ import annotations

import torch

from efformer.models import create_model
from efformer.nn.aux import collect_aux_losses
from efformer.results import ResultsStore
from efformer.train.config import build_run_config
from efformer.train.data import build_datasets, collate, loss_terms
from efformer.train.trainer import Trainer
from tests.train.conftest import tiny_run_dict

MOE = {"ffn": "moe", "ffn_options": {"n_experts": 4, "top_k": 2, "aux_loss_weight": 0.5, "z_loss_weight": 0.1}}


def _trainer(tmp_path, **train):
    raw = tiny_run_dict(tmp_path, **train)
    raw["model"].update(MOE)
    cfg = build_run_config(raw)
    torch.manual_seed(0)
    model = create_model(cfg.build_model_config())
    tr, ev = build_datasets(cfg.data, model.cfg)
    return Trainer(model, cfg.train, tr, ev, store=ResultsStore(cfg.results), out_dir=cfg.output_dir(),
                   run_config=cfg.model_dump()), tr


def test_aux_losses_are_added_to_the_gradient_and_logged(tmp_path):
    trainer, data = _trainer(tmp_path, steps=2, checkpoint_every=0, batch_size=8, clip_grad=None)
    model = trainer.raw
    batch = collate([data[i] for i in trainer.order.indices(0, 0).tolist()], trainer.pad_id)
    # the expected gradient: task loss mean + aux losses, computed by hand on the first batch
    model.train()
    total, count, _ = loss_terms(model, batch)
    aux = collect_aux_losses(model)
    expected = {n: g.clone() for n, g in zip(
        [n for n, _ in model.named_parameters()],
        torch.autograd.grad(total / count + sum(aux.values()), list(model.parameters()), allow_unused=True),
        strict=True) if g is not None}
    router_grad_without_aux = torch.autograd.grad(loss_terms(model, batch)[0] / count,
                                                  model.backbone.blocks[0].ffn.router.weight)[0]
    collect_aux_losses(model)
    seen = {}
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: (seen.update({n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}), step())
    trainer.train_step()
    trainer.optimizer.step = step
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert not torch.allclose(seen["backbone.blocks.0.ffn.router.weight"], router_grad_without_aux, atol=1e-6)
    final = trainer.fit()
    rows = trainer.store.metrics(trainer.run_id)
    names = {r["name"] for r in rows}
    assert {"aux_moe_balance", "aux_moe_z"} <= names, names
    balance = [r["value"] for r in rows if r["name"] == "aux_moe_balance"]
    assert all(0.5 * 0.9 < v < 0.5 * 4 for v in balance)  # weight 0.5 x a balance loss in [~1, n_experts]
    assert "train_aux_moe_balance" in final


def test_a_dense_model_has_no_aux_losses(tmp_path):
    model = create_model("lm-tiny", d_model=32, n_heads=2)
    model(torch.randint(0, 256, (1, 5)))
    assert collect_aux_losses(model) == {}


def test_expert_lr_scale_scales_only_the_experts_update(tmp_path):
    """AdamW's first step moves each weight by about lr * sign(grad): experts move lr_scale times as far."""
    deltas = []
    for scale in (1.0, 3.0):
        raw = tiny_run_dict(tmp_path / str(scale), steps=1, checkpoint_every=0, batch_size=8, clip_grad=None,
                            warmup_steps=0, weight_decay=0.0, lr=1e-3)
        raw["model"].update({**MOE, "ffn_options": {**MOE["ffn_options"], "expert_lr_scale": scale}})
        cfg = build_run_config(raw)
        torch.manual_seed(0)
        model = create_model(cfg.build_model_config())
        tr, ev = build_datasets(cfg.data, model.cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = Trainer(model, cfg.train, tr, ev, out_dir=cfg.output_dir())
        trainer.train_step()
        deltas.append({k: (v - before[k]) for k, v in model.state_dict().items()})
        if scale != 1.0:
            assert {g.get("lr_scale") for g in trainer.optimizer.param_groups} == {None, scale}
    for name, d1 in deltas[0].items():
        d3 = deltas[1][name]
        if name.endswith(("ffn.w_in", "ffn.w_out")):
            assert float(d1.abs().max()) > 0 and torch.allclose(d3, 3 * d1, rtol=1e-3, atol=1e-9), name
        else:
            assert torch.allclose(d3, d1, rtol=1e-3, atol=1e-7), name
