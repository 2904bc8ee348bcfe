"""Early exit: threshold >= 1 is the full model; exits pick the first confident head per row; CALM
decoding equals a full recomputation in which the skipped layers pass the exit state through."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.errors import CapabilityError, ConfigError
from efformer.models.early_exit import (
    classifier_exit_logits,
    classify_with_exit,
    exit_loss_terms,
    freeze_for_exit_distillation,
    generate_with_exit,
    lm_exit_logits,
)

LM = dict(d_model=32, n_heads=2, n_layers=4, vocab_size=30)


def lm(**kw):
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", **{**LM, "exit_layers": [0, 2], **kw}).eval()


def classifier(**kw):
    torch.manual_seed(0)
    return efformer.create_model("classifier-tiny", n_layers=3, vocab_size=30, exit_layers=[0, 1], **kw).eval()


@pytest.mark.parametrize("threshold", [1.0, 2.0, float("inf")])
def test_threshold_one_or_more_is_the_full_model(threshold):
    model = classifier(pooling="cls")
    ids = torch.randint(1, 30, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[2, 5:] = False
    logits, where = classify_with_exit(model, ids, mask, threshold)
    assert torch.equal(logits, model(ids, mask=mask).float()) and (where == 2).all()
    lmm = lm()
    prompt = torch.randint(1, 30, (2, 5))
    out, layers = generate_with_exit(lmm, prompt, 7, threshold)
    assert torch.equal(out, lmm.generate(prompt, max_new_tokens=7)) and (layers == 3).all()


@pytest.mark.parametrize("quantile", [None, 0.3, 0.7])
def test_each_row_takes_its_first_confident_exit(quantile):
    model = classifier(n_classes=5)
    ids = torch.randint(1, 30, (16, 7))
    final = model(ids).float()
    per_exit = [classifier_exit_logits(model, k, model.backbone.exit_hidden[i]).float() for k, i in enumerate([0, 1])]
    # a threshold inside the first exit's confidences, so some rows leave there and some go on
    threshold = 0.0 if quantile is None else float(per_exit[0].softmax(-1).amax(-1).quantile(quantile))
    logits, where = classify_with_exit(model, ids, None, threshold)
    for r in range(16):
        want, layer = final[r], 2
        for k, i in enumerate([0, 1]):
            if per_exit[k][r].softmax(-1).max() > threshold:
                want, layer = per_exit[k][r], i
                break
        torch.testing.assert_close(logits[r], want, atol=1e-6, rtol=1e-6)
        assert int(where[r]) == layer
    if threshold == 0.0:
        assert (where == 0).all()
    else:
        assert len(set(where.tolist())) >= 2, where


def _calm_reference(model, prompt, exit_layer, steps):
    """Greedy decoding by full recomputation: every generated position's hidden state is frozen at
    ``exit_layer`` (layers above pass it through, still computing keys/values from it)."""
    seq, n0 = prompt, prompt.shape[1]

    def freeze(module, args, kwargs, output):
        h = output[0].clone()
        h[:, n0:] = args[0][:, n0:]
        return h, output[1]

    handles = [b.register_forward_hook(freeze, with_kwargs=True) for b in model.backbone.blocks[exit_layer + 1:]]
    try:
        for t in range(steps):
            if t == 0:
                nxt = model(seq)[:, -1].argmax(-1)
            else:
                model(seq)
                nxt = lm_exit_logits(model, model.backbone.exit_hidden[exit_layer][:, -1:])[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    finally:
        for h in handles:
            h.remove()
    return seq


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_calm_decoding_equals_recomputation_with_the_exit_state_copied_up(positional):
    model = lm(positional=positional)
    prompt = torch.randint(1, 30, (2, 6))
    out, layers = generate_with_exit(model, prompt, 8, threshold=0.0)  # every decoded token exits at layer 0
    assert layers.tolist() == [3] + [0] * 7
    assert torch.equal(out, _calm_reference(model, prompt, 0, 8))
    assert not torch.equal(out, model.generate(prompt, max_new_tokens=8))  # exiting changed the continuation


def test_exit_losses_are_the_heads_cross_entropy_and_reach_the_trainer(tmp_path):
    from efformer.train.data import collate, loss_terms
    from efformer.train.trainer import Trainer

    model = lm(exit_loss_weight=0.5).train()
    data = [{"input_ids": torch.randint(1, 30, (8,))} for _ in range(4)]
    batch = collate(data, 0)
    total, count, _ = loss_terms(model, batch)
    ex = exit_loss_terms(model, batch)
    manual = 0
    for i in (0, 2):
        lg = lm_exit_logits(model, model.backbone.exit_hidden[i])[:, :-1]
        manual = manual + torch.nn.functional.cross_entropy(lg.reshape(-1, 30), batch["input_ids"][:, 1:].reshape(-1),
                                                            reduction="sum")
    torch.testing.assert_close(ex, 0.5 * manual)
    trainer = Trainer(model, {"steps": 2, "batch_size": 4, "checkpoint_every": 0, "log_every": 1}, data,
                      out_dir=tmp_path / "run")
    out = trainer.train_step()
    assert out["aux_exit"] == pytest.approx(ex.item() / float(count), rel=1e-4)


@pytest.mark.parametrize("task", ["lm", "classifier"])
def test_self_distillation_adds_the_tempered_kl_from_the_detached_final_head(task):
    """LGViT stage 2's loss by hand: CE + weight * T^2 * KL(final || exit); the teacher gets no gradient."""
    kw = dict(exit_loss_weight=0.5, exit_distill_weight=2.0, exit_distill_temperature=3.0)
    model = (lm(**kw) if task == "lm" else classifier(**kw)).train()
    F = torch.nn.functional
    if task == "lm":
        batch = {"input_ids": torch.randint(1, 30, (3, 9)), "mask": torch.ones(3, 9, dtype=torch.bool)}
        batch["mask"][2, 6:] = False
        final = model(batch["input_ids"], mask=batch["mask"])[:, :-1]
        exits = [lm_exit_logits(model, model.backbone.exit_hidden[i])[:, :-1] for i in (0, 2)]
        keep = (batch["mask"][:, 1:] & batch["mask"][:, :-1]).reshape(-1).float()
        target = batch["input_ids"][:, 1:].reshape(-1)
    else:
        batch = {"input_ids": torch.randint(1, 30, (4, 9)), "mask": torch.ones(4, 9, dtype=torch.bool),
                 "label": torch.tensor([0, 1, 1, 0])}
        final = model(batch["input_ids"], mask=batch["mask"])
        exits = [classifier_exit_logits(model, k, model.backbone.exit_hidden[i]) for k, i in enumerate((0, 1))]
        keep, target = torch.ones(4), batch["label"]
    got = exit_loss_terms(model, batch)
    p_final = (final.detach() / 3.0).softmax(-1).reshape(target.shape[0], -1)
    manual = 0
    for lg in exits:
        lg = lg.reshape(target.shape[0], -1)
        kl = (p_final * (p_final.log() - (lg / 3.0).log_softmax(-1))).sum(-1)
        manual = manual + ((0.5 * F.cross_entropy(lg, target, reduction="none") + 2.0 * 9.0 * kl) * keep).sum()
    torch.testing.assert_close(got, manual)
    model.zero_grad()
    head = model.lm_head if task == "lm" and not model.cfg.tie_embeddings else None
    got.backward()
    if task == "classifier":
        assert model.head[0].weight.grad is None  # the final head teaches; it is not taught
    assert head is None or head.weight.grad is None


def test_freezing_for_distillation_trains_only_the_exit_heads(tmp_path):
    from efformer.train.trainer import Trainer

    model = freeze_for_exit_distillation(classifier(exit_loss_weight=0.0, exit_distill_weight=1.0).train())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"input_ids": torch.randint(1, 30, (8,)), "label": torch.tensor(i % 2)} for i in range(8)]
    trainer = Trainer(model, {"steps": 2, "batch_size": 4, "checkpoint_every": 0, "log_every": 1, "lr": 1e-2},
                      data, out_dir=tmp_path / "run")
    out = trainer.train_step()
    assert out["aux_exit"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("exit_heads.") for k in changed)
    with pytest.raises(CapabilityError, match="share"):
        freeze_for_exit_distillation(lm())


def test_bad_exit_configs_are_refused():
    with pytest.raises(ConfigError, match="exit_distill_weight"):
        efformer.build_config(**LM, exit_distill_weight=1.0)
    for bad in ([3], [-1], [1, 0], [1, 1]):
        with pytest.raises(ConfigError, match="exit_layers"):
            efformer.build_config(**LM, exit_layers=bad)
    with pytest.raises(ConfigError, match="dual"):
        efformer.create_model("dual-tiny", exit_layers=[0])
    with pytest.raises(ConfigError, match="exit_layers"):
        generate_with_exit(efformer.create_model("lm-tiny", **LM), torch.ones(1, 2, dtype=torch.long), 2)
    with pytest.raises(CapabilityError, match="Mixture-of-Depths"):
        generate_with_exit(lm(mod_capacity=0.5), torch.ones(1, 2, dtype=torch.long), 2)
