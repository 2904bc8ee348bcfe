"""The results store under concurrent writers, and what reads it: runs list/show/compare and the
markdown + PNG report."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from efformer.cli import main
from efformer.errors import ConfigError
from efformer.results import ResultsStore
from efformer.train.report import compare_runs, series, write_report

WRITERS, ROWS = 4, 40


def _writer(path: str, worker: int, barrier) -> None:
    store = ResultsStore(path)
    barrier.wait()  # everyone writes at the same moment
    run = f"w{worker}"
    store.start_run(run, "train", {"worker": worker})
    for step in range(ROWS):
        store.log_metrics(run, step, {"loss": 1.0 / (step + 1), "lr": 1e-3})
        if step % 4 == 0:
            store.log_eval(run, "eval", {"accuracy": step / ROWS}, step=step)
    store.finish_run(run)


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = str(tmp_path / "r.db")
    ResultsStore(path)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(path, w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    store = ResultsStore(path)
    assert store.query("SELECT COUNT(*) AS n FROM metrics")[0]["n"] == WRITERS * ROWS * 2
    assert store.query("SELECT COUNT(*) AS n FROM evals")[0]["n"] == WRITERS * ROWS // 4
    assert sorted(r["run_id"] for r in store.runs()) == [f"w{w}" for w in range(WRITERS)]
    assert {r["status"] for r in store.runs()} == {"done"}


def _first_writer(path: str, worker: int, barrier) -> None:
    store = ResultsStore(path)  # the file does not exist yet: the first write makes it
    barrier.wait()
    store.start_run(f"w{worker}", "train", {})


def test_many_processes_creating_a_new_results_file_at_once_all_succeed(tmp_path):
    # Switching a new file to WAL and making its tables raced here: SQLite answers "database is
    # locked" at once, without waiting, to a deferred transaction that must upgrade to a write.
    ctx = mp.get_context("fork")
    for attempt in range(4):
        path = str(tmp_path / f"new{attempt}.db")
        barrier = ctx.Barrier(12)
        procs = [ctx.Process(target=_first_writer, args=(path, w, barrier)) for w in range(12)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * 12
        assert len(ResultsStore(path).runs()) == 12


def _filled(tmp_path) -> ResultsStore:
    store = ResultsStore(tmp_path / "r.db")
    for run, lr in (("alpha", 1e-3), ("beta", 3e-4)):
        store.start_run(run, "train", {"model": {"mixer": "softmax"}, "train": {"lr": lr, "steps": 4}})
        for step in range(1, 5):
            store.log_metrics(run, step, {"loss": 2.0 / step + lr, "lr": lr})
        store.log_eval(run, "eval", {"loss": 0.5 + lr, "accuracy": 0.75}, step=4)
        store.log_metrics(run, 4, {"eval_loss": 0.5 + lr})
        store.finish_run(run)
    store.log_metrics("alpha", 3, {"loss": 0.123})  # a resumed run logs step 3 again: the later row wins
    return store


def test_series_keeps_the_last_value_of_a_repeated_step(tmp_path):
    store = _filled(tmp_path)
    assert [s for s, _ in series(store, "alpha", "loss")] == [1, 2, 3, 4]
    assert series(store, "alpha", "loss")[2] == (3, 0.123)


def test_runs_list_show_compare_commands(tmp_path, capsys):
    store = _filled(tmp_path)
    db = str(store.path)
    assert main(["runs", "list", "--results", db]) == 0
    out = capsys.readouterr().out
    assert "| alpha | train | done |" in out and "| beta |" in out
    assert main(["runs", "show", "alph", "--results", db]) == 0  # a unique prefix is enough
    out = capsys.readouterr().out
    assert "# run alpha" in out and "| train.lr | 0.001 |" in out and "eval_accuracy" in out
    assert main(["runs", "compare", "alpha", "beta", "--results", db]) == 0
    out = capsys.readouterr().out
    assert "| train.lr | 0.001 | 0.0003 |" in out and "model.mixer" not in out  # only differences
    assert main(["runs", "show", "gamma", "--results", db]) == 2
    assert "gamma" in capsys.readouterr().err
    assert main(["runs", "list", "--results", str(tmp_path / "none.db")]) == 2


def test_report_writes_markdown_and_pngs_from_the_store_alone(tmp_path, capsys):
    store = _filled(tmp_path)
    assert main(["report", "--results", str(store.path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| alpha |" in md and "![loss](loss.png)" in md and "![eval_loss](eval_loss.png)" in md
    for name in ("loss", "eval_loss", "lr"):
        assert (tmp_path / "rep" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = write_report(store, tmp_path / "cmp", ["alpha", "beta"])
    assert "config differences" in report.read_text()
    with pytest.raises(ConfigError, match="run_id"):
        compare_runs(store, ["alpha", "nope"])
