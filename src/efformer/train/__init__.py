"""Training: run configs, datasets and batching, schedules, the trainer, checkpoints, torchrun, reports."""

from efformer.train.config import DataConfig, RunConfig, TrainConfig, build_run_config, load_run_config
from efformer.train.data import BatchOrder, collate, compute_loss, register_dataset
from efformer.train.trainer import DivergedError, Trainer, build_optimizer

__all__ = [
    "BatchOrder", "DataConfig", "DivergedError", "RunConfig", "TrainConfig", "Trainer", "build_optimizer",
    "build_run_config", "collate", "compute_loss", "load_run_config", "register_dataset",
]
