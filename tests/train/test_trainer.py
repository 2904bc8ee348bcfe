"""The trainer: learns a real task, stops cleanly on a non-finite loss, accumulation equals a big
batch, early stopping, bf16, weight-decay groups, progress output and results-store rows."""

from __future__ import annotations

import io
import math

import pytest
import torch

import efformer
from efformer.train.checkpoint import list_checkpoints, load_checkpoint
from efformer.train.progress import Progress
from efformer.train.trainer import DivergedError, param_groups


def test_copy_task_trains_to_clearly_better_than_chance(tiny):
    # 5 random symbols out of 8, a separator, the same 5 again: without copying a model can at best
    # predict the separator (accuracy (1 + 10/8) / 11 = 0.20); copying lifts the ceiling to 0.66.
    t, _ = tiny(steps=150, batch_size=32, lr=1e-2, warmup_steps=10, checkpoint_every=0, log_every=50)
    final = t.fit()
    assert final["eval_accuracy"] > 0.35, final
    assert final["eval_loss"] < 0.8 * math.log(8), final


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny):
    t, cfg = tiny(steps=10, checkpoint_every=2)
    t.raw.backbone.final_norm.register_forward_hook(lambda m, i, o: o * float("nan") if t.step >= 5 else o)
    with pytest.raises(DivergedError, match=r"loss nan at step 6 .*step_00000004"):
        t.fit()
    assert [p.name for p in list_checkpoints(t.ckpt_dir)] == ["step_00000002", "step_00000004"]
    assert load_checkpoint(t.ckpt_dir)[1]["step"] == 4  # intact, verifiable
    assert all(torch.isfinite(p).all() for p in t.raw.parameters())  # the bad update was not applied
    (run,) = t.store.runs()
    assert run["status"] == "diverged"


def test_gradient_accumulation_equals_one_big_batch(tiny):
    a, _ = tiny(steps=3, batch_size=8, grad_accum=1, checkpoint_every=0)
    a.fit()
    b, _ = tiny(steps=3, batch_size=8, grad_accum=4, checkpoint_every=0)
    b.fit()
    for x, y in zip(a.history, b.history, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    for (k, v), w in zip(a.raw.state_dict().items(), b.raw.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=k)


def test_same_seed_same_weights_other_seed_other_weights(tiny):
    runs = []
    for seed in (0, 0, 1):
        t, _ = tiny(steps=2, seed=seed, checkpoint_every=0)
        t.fit()
        runs.append(t.raw.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_early_stopping_stops_after_patience_evals_without_gain(tiny):
    t, _ = tiny(steps=20, lr=1e-30, weight_decay=0.0, eval_every=1, early_stopping=2, checkpoint_every=0)
    t.fit()
    assert t.step == 3  # eval 1 sets the best; evals 2 and 3 do not beat it
    assert t.store.runs()[0]["status"] == "early_stopped"


def test_bf16_autocast_trains(tiny):
    t, _ = tiny(steps=3, precision="bf16", checkpoint_every=0)
    final = t.fit()
    assert math.isfinite(final["train_loss"]) and math.isfinite(final["eval_loss"])


def test_no_decay_on_norms_biases_and_embeddings():
    model = efformer.create_model("classifier-tiny", vocab_size=16, d_model=16, n_layers=1, n_heads=2)
    decay, no_decay = param_groups(model, 0.1, exclude=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert not decayed & kept and decayed | kept == set(names.values())
    assert "backbone.embed.weight" in kept and all(p.dim() >= 2 for p in decay["params"])
    assert any("norm" in n for n in kept) and any(n.endswith("bias") for n in kept)
    assert any(n.endswith("weight") and "head" in n for n in decayed)
    (everything,) = param_groups(model, 0.1, exclude=False)
    assert len(everything["params"]) == len(names)


def test_on_step_is_called_after_every_step_with_the_loss(tiny):
    t, _ = tiny(steps=3)
    seen = []
    t.on_step = lambda step, total, loss: seen.append((step, total, loss))
    t.fit()
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [s[2] for s in seen] == [h["loss"] for h in t.history]


def test_results_store_gets_config_metrics_and_evals(tiny):
    t, cfg = tiny(steps=4, eval_every=2, log_every=2)
    t.fit()
    (run,) = t.store.runs()
    assert run["status"] == "done" and run["device"] == "cpu" and run["code_version"]
    assert '"d_model": 32' in run["config"]
    assert [r["step"] for r in t.store.metrics(run["run_id"], "loss")] == [2, 4]
    assert {(r["split"], r["metric"], r["step"]) for r in t.store.evals(run["run_id"])} >= {
        ("eval", "loss", 2), ("eval", "accuracy", 4)}
    assert (cfg.output_dir() / "model" / "model.safetensors").is_file()
    assert efformer.load(cfg.output_dir() / "model").cfg.d_model == 32


def test_progress_is_a_bar_on_a_tty_and_log_lines_otherwise():
    plain = io.StringIO()
    p = Progress(4, log_every=2, stream=plain)
    for s in range(1, 5):
        p.update(s, loss=1.0 / s, lr=1e-3, tokens=100)
    p.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 2/4 loss 0.5000 lr 1.000e-03 tok/s") and "eta" in lines[0]
    tty = io.StringIO()
    p = Progress(4, stream=tty, tty=True)
    p.update(2, loss=0.5, lr=1e-3, tokens=100)
    p.close()
    assert "\r" in tty.getvalue() and "2/4" in tty.getvalue() and "loss=0.5000" in tty.getvalue()
    quiet = io.StringIO()
    p = Progress(4, stream=quiet, enabled=False)
    p.update(4, 1.0, 1e-3, 10)
    p.write("x")
    assert quiet.getvalue() == ""


def test_packed_mode_trains_like_padded_mode(tiny):
    # train.packed lays each micro-batch's sequences end to end; on the copy task the loss terms are
    # the same as padded ones, so the runs agree (tests/models/test_packing.py covers ragged lengths)
    runs = []
    for packed in (False, True):
        t, _ = tiny(steps=3, batch_size=8, checkpoint_every=0, packed=packed)
        t.fit()
        runs.append(t)
    for x, y in zip(runs[0].history, runs[1].history, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
