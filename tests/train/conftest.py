"""Tiny runs shared by the training tests: a 1-layer d=32 LM on the copy task."""

from __future__ import annotations

import pytest


def tiny_run_dict(tmp_path, **train) -> dict:
    """A raw run config small enough to train a few steps in well under a second."""
    return {
        "name": "tiny",
        "out_dir": str(tmp_path / "run"),
        "results": str(tmp_path / "results.db"),
        "model": {"preset": "lm-tiny", "d_model": 32, "n_heads": 2, "n_layers": 1, "vocab_size": 16, "max_len": 64},
        "data": {"name": "copy", "options": {"length": 5, "symbols": 8, "n_train": 256, "n_eval": 32}},
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "log_every": 1,
                  "checkpoint_every": 2, "keep_last": 2, "seed": 0, **train},
    }


@pytest.fixture
def tiny(tmp_path):
    """Factory: (trainer, run config) for the tiny copy-task LM, with a results store."""
    import torch

    from efformer.models import create_model
    from efformer.results import ResultsStore
    from efformer.train.config import build_run_config
    from efformer.train.data import build_datasets
    from efformer.train.trainer import Trainer

    def make(**train):
        cfg = build_run_config(tiny_run_dict(tmp_path, **train))
        torch.manual_seed(cfg.train.seed)
        model = create_model(cfg.build_model_config())
        tr, ev = build_datasets(cfg.data, model.cfg)
        trainer = Trainer(model, cfg.train, tr, ev, store=ResultsStore(cfg.results), out_dir=cfg.output_dir(),
                          run_config=cfg.model_dump())
        return trainer, cfg

    return make
