"""Batching and losses: padding sides and masks, pad-invariant losses, deterministic batch order,
built-in datasets, learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import efformer
from efformer.errors import DataError
from efformer.train.data import BatchOrder, build_datasets, collate, compute_loss, count_terms
from efformer.train.schedules import lr_multiplier


def _lm():
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, max_len=64)


def test_collate_pads_lm_left_and_classifier_right_with_keep_masks():
    a, b = torch.tensor([5, 6, 7]), torch.tensor([8])
    lm = collate([{"input_ids": a}, {"input_ids": b}], pad_id=0)
    assert lm["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert lm["mask"].tolist() == [[True] * 3, [False, False, True]]
    cl = collate([{"input_ids": a, "label": torch.tensor(1)}, {"input_ids": b, "label": torch.tensor(0)}], pad_id=3)
    assert cl["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]] and cl["label"].tolist() == [1, 0]
    du = collate([{"ids1": a, "ids2": b, "label": torch.tensor(1)}, {"ids1": b, "ids2": a, "label": torch.tensor(0)}])
    assert du["mask1"].tolist() == [[True] * 3, [True, False, False]]
    assert du["ids2"].tolist() == [[8, 0, 0], [5, 6, 7]]


@pytest.mark.parametrize("examples", [[], [{"tokens": torch.tensor([1])}],
                                      [{"input_ids": torch.tensor([1])}, {"ids1": torch.tensor([1])}],
                                      [{"input_ids": torch.ones(2, 2, dtype=torch.long)}]])
def test_collate_refuses_malformed_examples(examples):
    with pytest.raises(DataError):
        collate(examples)


def test_lm_loss_ignores_pads_and_equals_token_weighted_mean_of_rows():
    model = _lm().eval()
    rows = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([9, 10])]
    batch = collate([{"input_ids": r} for r in rows])
    loss, metrics = compute_loss(model, batch)
    per_row = []
    for r in rows:
        logits = model(r[None])[0, :-1]
        per_row.append(F.cross_entropy(logits, r[1:], reduction="sum"))
    expected = sum(per_row) / (len(rows[0]) - 1 + len(rows[1]) - 1)
    assert count_terms(batch) == 5
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(float(expected.detach())), rel=1e-4)
    # changing pad content changes nothing
    batch["input_ids"][1, :3] = 17
    torch.testing.assert_close(compute_loss(model, batch)[0], loss)


@pytest.mark.parametrize("preset", ["classifier-tiny", "dual-tiny"])
def test_classifier_and_dual_loss_and_accuracy(preset):
    torch.manual_seed(0)
    model = efformer.create_model(preset, vocab_size=32, d_model=16, n_layers=1, n_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    exs = []
    for i in range(6):
        ids = torch.randint(1, 32, (3 + i,), generator=g)
        label = torch.tensor(i % 2)
        exs.append({"input_ids": ids, "label": label} if preset.startswith("cl") else
                   {"ids1": ids, "ids2": ids.flip(0)[:4], "label": label})
    batch = collate(exs)
    loss, metrics = compute_loss(model, batch)
    if preset.startswith("cl"):
        logits = model(batch["input_ids"], mask=batch["mask"])
    else:
        logits = model(batch["ids1"], batch["ids2"], mask1=batch["mask1"], mask2=batch["mask2"])
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["label"]))
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == batch["label"]).float().mean()))


def test_per_position_targets_score_only_the_asked_positions():
    """Recall tasks' {input_ids, targets}: left-padded with IGNORE targets; loss and accuracy over asked tokens."""
    model = _lm().eval()
    a = {"input_ids": torch.tensor([5, 6, 7, 8]), "targets": torch.tensor([-100, 9, -100, 3])}
    b = {"input_ids": torch.tensor([4, 2]), "targets": torch.tensor([-100, 11])}
    batch = collate([a, b])
    assert batch["targets"].tolist() == [[-100, 9, -100, 3], [-100, -100, -100, 11]]
    assert count_terms(batch) == 3
    loss, metrics = compute_loss(model, batch)
    with torch.no_grad():
        la, lb = model(a["input_ids"][None])[0], model(b["input_ids"][None])[0]
    picked = torch.stack([la[1], la[3], lb[1]])
    want = F.cross_entropy(picked, torch.tensor([9, 3, 11]))
    assert torch.allclose(loss, want, atol=1e-5)
    assert metrics["accuracy"] == (picked.argmax(-1) == torch.tensor([9, 3, 11])).float().mean().item()


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(n_examples=23, batch_size=5, seed=3)
    assert order.batches_per_epoch == 4
    epoch0 = torch.cat([order.indices(0, i) for i in range(4)])
    assert len(set(epoch0.tolist())) == 20  # no repeats within an epoch; the last 3 are dropped
    assert torch.equal(order.indices(0, 2), BatchOrder(23, 5, 3).indices(0, 2))  # position fixes the batch
    assert not torch.equal(order.indices(1, 0), order.indices(0, 0))
    assert not torch.equal(BatchOrder(23, 5, 4).indices(0, 0), order.indices(0, 0))


def test_copy_and_text_datasets_follow_the_interface(tmp_path):
    from efformer.train.config import DataConfig

    cfg = efformer.build_config({"vocab_size": 256})
    train, ev = build_datasets(DataConfig(name="copy", options={"length": 4, "n_train": 10, "n_eval": 3}), cfg)
    x = train[0]["input_ids"]
    assert len(train) == 10 and len(ev) == 3 and x.dtype == torch.long and x.shape == (9,)
    assert torch.equal(x[:4], x[5:]) and x[4] == 17
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(200)))
    train, ev = build_datasets(DataConfig(name="text", options={"path": str(path), "seq_len": 10, "stride": 10,
                                                                 "eval_fraction": 0.1}), cfg)
    assert len(train) == 18 and train[1]["input_ids"].tolist() == list(range(10, 20))
    assert ev[0]["input_ids"].tolist() == list(range(180, 190))


def test_schedules_hit_their_landmarks():
    lm = lr_multiplier
    assert lm("cosine", 9, 100, warmup=10) == pytest.approx(1.0)
    assert lm("cosine", 0, 100, warmup=10) == pytest.approx(0.1)
    assert lm("cosine", 99, 100, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lm("cosine", 54, 100, warmup=10, min_ratio=0.0) == pytest.approx(0.5)  # halfway through decay
    assert lm("linear", 54, 100, warmup=10, min_ratio=0.0) == pytest.approx(0.5)
    assert lm("linear", 99, 100, warmup=0, min_ratio=0.2) == pytest.approx(0.2)
    assert lm("constant", 99, 100, warmup=10) == 1.0
    assert lm("inverse_sqrt", 39, 1000, warmup=10) == pytest.approx(0.5)  # sqrt(10 / 40)
    cos = [lm("cosine", s, 50, warmup=5) for s in range(50)]
    assert all(a >= b for a, b in zip(cos[4:], cos[5:], strict=False))  # monotone after warmup
