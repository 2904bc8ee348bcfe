"""Recall tasks in the arena: specs, generated splits, a grid cell per causal mixer, the leaderboard column."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import efformer.arena.runner as runner
from efformer.arena.leaderboard import render
from efformer.arena.tasks import RECALL_NAMES, build_datasets, get_task
from efformer.cli import main
from efformer.data.recall import IGNORE, first_asked, mqar_no_recall_baseline
from efformer.errors import UnknownNameError
from efformer.models.config import build_config
from efformer.registry import MIXERS
from efformer.results import ResultsStore

BIDIRECTIONAL_ONLY = next(m for m in MIXERS.names() if not MIXERS.get(m).capabilities.causal)


def test_every_recall_task_is_a_causal_lm_with_its_generated_splits():
    for name in RECALL_NAMES:
        spec = get_task(name, "quick")
        cfg = build_config(spec.model_config(mixer="h3", encoder_causal=True))
        assert spec.task == "lm" and cfg.task == "lm" and cfg.causal and cfg.vocab_size == spec.vocab_size
        train, val, test = build_datasets(spec)
        assert (len(train), len(val), len(test)) == (spec.data["n_train"], spec.data["n_val"], spec.data["n_test"])
        assert train.seq_len == spec.seq_len <= cfg.max_len and int(train.inputs.max()) < spec.vocab_size
        assert not torch.equal(train.inputs[: len(test)], test.inputs)  # the splits are different draws
        assert (test.targets != IGNORE).any(1).all()  # every example asks something
    assert get_task("mqar", "paper").seq_len == 256
    with pytest.raises(UnknownNameError, match="mqar"):
        get_task("mqr")


def test_chance_of_a_recall_task_is_its_commonest_answer():
    test = build_datasets(get_task("mqar", "quick"))[2]
    chance = runner.chance_accuracy(test)
    assert 1 / 32 <= chance < 2 / 32  # 32 values drawn uniformly


@pytest.fixture
def tiny_mqar(monkeypatch):
    spec = get_task("mqar", "quick")
    tiny = dataclasses.replace(spec, preset="tiny", data=dict(spec.data, n_train=64, n_val=16, n_test=16),
                               model=dict(spec.model, d_model=16, n_layers=1, n_heads=2),
                               optim=dict(spec.optim, steps=2, batch_size=16, warmup=1))
    monkeypatch.setattr(runner, "get_task", lambda name, preset="quick": tiny)


def test_grid_trains_causal_mixers_and_marks_bidirectional_ones_unsupported(tmp_path, tiny_mqar):
    store = ResultsStore(tmp_path / "r.db")
    res = runner.run_grid("quick", ["h3", BIDIRECTIONAL_ONLY], ["mqar"], [0], store, tmp_path / "runs",
                          log=lambda s: None, in_process=True)
    assert [r.status for r in res] == ["done", "unsupported"]
    assert "causal language-model task" in res[1].error
    rows = runner.summary_rows(store, "tiny")
    assert [(r["task"], r["mixer"]) for r in rows] == [("mqar", "h3")] and 0 <= rows[0]["accuracy"] <= 1
    # MQAR reports the no-recall baseline (8 pairs: H_8/8, first query 1/8) and the first-query accuracy
    assert rows[0]["baseline"] == pytest.approx(mqar_no_recall_baseline(8)[0])
    assert rows[0]["first_query_baseline"] == 1 / 8
    assert 0 <= rows[0]["first_query"] <= 1
    board = render(store, "tiny", tmp_path / "out").read_text()
    assert "| mqar | h3 (seed 0) |" in board and f"| {100 * mqar_no_recall_baseline(8)[0]:.1f} | 12.5 |" in board


def test_first_query_accuracy_counts_only_each_examples_first_query():
    test = build_datasets(get_task("mqar", "quick"))[2][:8]

    class Oracle(torch.nn.Module):  # answers only the first query of each example right
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids, mask=None):
            t = torch.stack([e["targets"] for e in test])
            right = torch.where(first_asked(t), t, 0).clamp_min(0)
            return torch.nn.functional.one_hot(right, 100).float()

    assert runner.first_query_accuracy(Oracle(), test) == 1.0


@pytest.mark.slow  # a worker process per cell: about 90 s on a busy 2-core machine
def test_arena_command_runs_mqar_and_the_leaderboard_shows_it(tmp_path, tiny_mqar, capsys):
    assert main(["arena", "--mixers", "s4", "--tasks", "mqar", "--store", str(tmp_path / "r.db"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "1 done" in capsys.readouterr().out
    board = render(ResultsStore(tmp_path / "r.db"), "tiny", tmp_path / "out").read_text()
    assert "| mixer | mqar |" in board and "| s4 |" in board
    assert "Beside the LRA paper" not in board  # the paper has no recall column
