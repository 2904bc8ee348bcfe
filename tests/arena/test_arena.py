"""The arena: a grid stores one row per cell, skips finished cells, and renders the leaderboard."""

from __future__ import annotations

import dataclasses
import math

import pytest

import efformer.arena.runner as runner
from efformer.arena.leaderboard import render
from efformer.arena.tasks import get_task
from efformer.cli import main
from efformer.errors import UnknownNameError
from efformer.registry import MIXERS
from efformer.results import ResultsStore

CAUSAL_ONLY = next((m for m in MIXERS.names() if not MIXERS.get(m).capabilities.bidirectional), "softmax")


def _tiny(name="listops"):
    spec = get_task(name, "quick")
    if name == "listops":
        data = dict(spec.data, min_len=8, max_len=32, max_depth=3, n_train=96, n_val=32, n_test=32)
        return dataclasses.replace(spec, data=data, seq_len=32, preset="tiny",
                                   optim=dict(spec.optim, steps=3, batch_size=16, warmup=1))
    return dataclasses.replace(spec, preset="tiny")


@pytest.fixture
def tiny_tasks(monkeypatch):
    monkeypatch.setattr(runner, "get_task", lambda name, preset="quick": _tiny(name))


def test_grid_stores_every_cell_then_skips_them(tmp_path, tiny_tasks):
    store = ResultsStore(tmp_path / "r.db")
    mixers = ["softmax", CAUSAL_ONLY]
    res = runner.run_grid("quick", mixers, ["listops"], [0, 1], store, tmp_path / "runs", tmp_path / "data",
                          log=lambda s: None)
    assert [r.status for r in res] == ["done"] * 4
    rows = runner.summary_rows(store, "tiny")
    assert sorted((r["mixer"], r["seed"]) for r in rows) == sorted((m, s) for m in mixers for s in (0, 1))
    for r in rows:  # each cell ran in its own worker, so its memory is its own training's growth
        assert 0 <= r["accuracy"] <= 1 and r["params"] > 0 and r["steps_per_s"] > 0 and r["peak_mem_mb"] > 0
    assert {run["kind"] for run in store.runs()} == {"arena"}
    again = runner.run_grid("quick", mixers, ["listops"], [0, 1], store, tmp_path / "runs", tmp_path / "data",
                            log=lambda s: None)
    assert [r.status for r in again] == ["skipped"] * 4


def test_file_tasks_without_files_are_reported_not_crashed(tmp_path, tiny_tasks):
    res = runner.run_grid("quick", ["softmax"], ["text"], [0], ResultsStore(tmp_path / "r.db"), tmp_path,
                          None, log=lambda s: None)
    assert res[0].status == "missing-data" and "aclImdb" in res[0].error


def test_unknown_mixer_fails_before_training(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'softmax'"):
        runner.run_grid("quick", ["sofmax"], ["listops"], [0], ResultsStore(tmp_path / "r.db"), tmp_path)


def test_lra_rsqrt_schedule_maps_to_its_peak():
    spec = get_task("listops", "paper")
    cfg = runner.train_config(spec, seed=0)
    assert cfg.schedule == "inverse_sqrt" and cfg.warmup_steps == 1000
    assert cfg.lr == pytest.approx(0.05 / math.sqrt(1000))  # LRA's base 0.05 peaks at 0.05/sqrt(warmup)
    causal_only_cfg = runner.model_config(get_task("listops", "quick"), CAUSAL_ONLY)
    assert causal_only_cfg.encoder_causal == (not MIXERS.get(CAUSAL_ONLY).capabilities.bidirectional)


def test_leaderboard_table_plot_and_paper_columns_come_from_the_store(tmp_path, tiny_tasks):
    store = ResultsStore(tmp_path / "r.db")
    runner.run_grid("quick", ["softmax", "linear"], ["listops"], [0], store, tmp_path / "runs", tmp_path / "data",
                    log=lambda s: None)
    md = render(store, "tiny", tmp_path / "board").read_text()
    assert "| softmax |" in md and "| linear |" in md and "not comparable" in md
    assert "| softmax | Transformer |" in md and "36.37" in md  # the paper's Table 1 beside ours
    assert (tmp_path / "board" / "leaderboard.png").stat().st_size > 5000
    empty = render(store, "paper", tmp_path / "board2").read_text()
    assert "No finished arena cells" in empty


def test_arena_command_end_to_end(tmp_path, tiny_tasks, capsys):
    assert main(["arena", "--mixers", "softmax", "--tasks", "listops", "--store", str(tmp_path / "r.db"),
                 "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "1 done" in out and "leaderboard:" in out


@pytest.mark.slow
def test_quick_listops_trains_softmax_clearly_above_chance(tmp_path):
    spec = get_task("listops", "quick")
    store = ResultsStore(tmp_path / "r.db")
    res = runner.run_cell(spec, "softmax", 0, store, tmp_path / "runs", tmp_path / "data")
    assert res.status == "done"
    majority = 0.2  # the most frequent ListOps labels (0 and 9) each hold under 20% of examples
    assert res.accuracy > majority + 0.1, res.accuracy


def test_a_cell_does_not_depend_on_the_cells_before_it(tmp_path, tiny_tasks):
    # in one process, where leftover global RNG state from earlier cells could leak into a cell
    alone = ResultsStore(tmp_path / "alone.db")
    runner.run_grid("quick", ["linear"], ["listops"], [0], alone, tmp_path / "a", tmp_path / "data", log=lambda s: None,
                    in_process=True)
    after = ResultsStore(tmp_path / "after.db")
    runner.run_grid("quick", ["softmax", "linear"], ["listops"], [0], after, tmp_path / "b", tmp_path / "data",
                    log=lambda s: None, in_process=True)

    def linear_test_loss(store):
        run_id = runner.cell_run_id("tiny", "listops", "linear", 0)
        return next(e["value"] for e in store.evals(run_id) if e["split"] == "test" and e["metric"] == "loss")

    assert linear_test_loss(alone) == linear_test_loss(after)


def test_cell_progress_prints_steps_per_second_and_is_throttled(capsys):
    progress = runner.CellProgress("[2/7] quick/listops/softmax/seed0", every_s=0.0)
    for step in range(1, 5):
        progress(step, 4, 2.5 - 0.1 * step)
    lines = capsys.readouterr().out.splitlines()
    # the first step only starts the clock (start-up costs are not training speed); then one line per step
    assert len(lines) == 3 and all(ln.strip().startswith("[2/7] quick/listops/softmax/seed0 step ") for ln in lines)
    assert "step 4/4 loss 2.1000" in lines[-1] and "steps/s" in lines[-1]
    quiet = runner.CellProgress("cell", every_s=1e9)  # throttled: only the last step is due
    for step in range(1, 5):
        quiet(step, 4, 1.0)
    assert [ln.split()[2] for ln in capsys.readouterr().out.splitlines()] == ["4/4"]


def test_chance_is_the_majority_class_of_the_data():
    import torch

    data = [{"label": torch.tensor(v)} for v in (1, 1, 2, 0, 1, 2)]
    assert runner.chance_accuracy(data) == pytest.approx(3 / 6)


def test_default_quick_grid_is_the_fixed_set_and_says_how_to_add_the_rest(tmp_path, tiny_tasks, monkeypatch):
    grid, left = runner.default_mixers("quick")
    seq = runner.sequence_mixers()  # every mixer but the 2-D ones, which need an image model
    assert set(seq) == {m for m in MIXERS.names() if not MIXERS.get(m).capabilities.grid}
    assert set(grid) | set(left) == set(seq) and not set(grid) & set(left)
    assert set(grid) == set(runner.QUICK_GRID) and len(grid) == len(runner.QUICK_GRID)  # every name registered
    assert runner.default_mixers("paper") == (seq, [])
    monkeypatch.setattr(runner, "default_mixers", lambda preset: (["softmax"], ["mamba"]))
    store, said = ResultsStore(tmp_path / "r.db"), []
    res = runner.run_grid("quick", None, ["listops"], [0], store, tmp_path / "runs", tmp_path / "data",
                          log=said.append, in_process=True)
    assert [r.status for r in res] == ["done"]
    assert said[0].startswith("left out of the default quick grid") and "--mixers mamba" in said[0]
    assert any("[1/1]" in s and "training 3 steps" in s for s in said)
    # the chance level is measured on the cell's own test split and shown in the leaderboard
    _, _, test = runner.build_datasets(_tiny(), "tiny", data_dir=tmp_path / "data")
    (row,) = runner.summary_rows(store, "tiny")
    assert row["chance"] == pytest.approx(runner.chance_accuracy(test)) and row["steps"] == 3
    md = render(store, "tiny", tmp_path / "board").read_text()
    assert f"| *chance (majority class)* | {100 * row['chance']:.1f} |" in md
    assert "leaves out" not in md  # only the quick preset has a reduced default grid


def test_quick_pathfinder_is_not_offered(tmp_path):
    from efformer.errors import ConfigError

    with pytest.raises(ConfigError, match="below chance"):
        runner.run_grid("quick", ["softmax"], ["pathfinder"], [0], ResultsStore(tmp_path / "r.db"), tmp_path)


def test_bubble_labels_never_overlap_even_when_mixers_crowd_at_chance():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from efformer.arena.leaderboard import _overlap, _place_labels

    names = MIXERS.names()
    pts = [(m, 2.0 + 0.05 * i, 17.4 + 0.01 * (i % 3)) for i, m in enumerate(names)]  # one crowded cluster
    pts.append(("far_away", 40.0, 38.0))
    fig, ax = plt.subplots(figsize=(11, 7))
    ax.scatter([p[1] for p in pts], [p[2] for p in pts])
    ax.set_xscale("log")
    ax.set_ylim(10, 45)
    fig.tight_layout()
    boxes = _place_labels(fig, ax, pts)
    plt.close(fig)
    assert len(boxes) == len(pts)
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
