"""``efformer eval RUN_DIR`` after ``efformer train``: it prints the metrics the trainer stored."""

from __future__ import annotations

import json

import pytest
import yaml

from efformer.results import ResultsStore


def test_eval_of_a_trained_run_reprints_the_stored_metrics(tmp_path, capsys):
    """An eval split smaller than one training batch (22 windows, batch 32) still evaluates."""
    from efformer.cli import main

    raw = {
        "name": "evalme", "out_dir": str(tmp_path / "run"), "results": str(tmp_path / "results.db"),
        "model": {"preset": "lm-tiny", "d_model": 32, "n_heads": 2, "n_layers": 1, "max_len": 64},
        "data": {"name": "text", "options": {"seq_len": 32, "stride": 8}},  # the bundled corpus
        "train": {"steps": 3, "batch_size": 32, "eval_every": 0, "log_every": 1, "checkpoint_every": 0,
                  "device": "cpu"},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    store = ResultsStore(raw["results"])
    (run,) = store.runs("train")
    stored = {e["metric"]: e["value"] for e in store.evals(run["run_id"]) if e["split"] == "eval"}
    assert {"loss", "accuracy", "ppl"} <= set(stored)

    assert main(["eval", raw["out_dir"]]) == 0
    printed = json.loads(capsys.readouterr().out)
    for k in ("loss", "accuracy", "ppl"):
        assert printed[k] == pytest.approx(stored[k], rel=1e-6), k
