"""examples/train-lm.yaml: the example a new user runs first loads, validates and trains."""

from __future__ import annotations

import math
from pathlib import Path

import efformer
from efformer.train.cli import run_training
from efformer.train.config import load_run_config
from efformer.train.data import build_datasets

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train-lm.yaml"


def test_example_config_validates_as_a_byte_level_lm_on_the_bundled_corpus():
    cfg = load_run_config(EXAMPLE)
    model = cfg.build_model_config()
    assert model.task == "lm" and model.vocab_size == 256
    assert cfg.data.name == "text" and "path" not in cfg.data.options  # the bundled corpus
    train, ev = build_datasets(cfg.data, model)
    assert len(train) >= cfg.train.batch_size and len(ev) > 0
    assert cfg.train.warmup_steps < cfg.train.steps and cfg.train.eval_every <= cfg.train.steps


def test_example_config_trains_two_steps(tmp_path):
    cfg = load_run_config(EXAMPLE, ["train.steps=2", "train.warmup_steps=0", "train.device=cpu",
                                    f"out_dir={tmp_path / 'run'}", f"results={tmp_path / 'results.db'}"])
    final = run_training(cfg)
    assert final["step"] == 2
    # two steps from random init: still near the uniform-byte loss ln 256, and finite
    assert math.isfinite(final["eval_loss"]) and abs(final["eval_loss"] - math.log(256)) < 1.0
    model = efformer.load(tmp_path / "run" / "model")
    assert model.cfg.vocab_size == 256 and (tmp_path / "results.db").is_file()
