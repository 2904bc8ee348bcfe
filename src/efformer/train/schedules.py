"""Learning-rate schedules as pure functions of the step, so a resumed run needs only the step count.

All start with a linear warmup over ``warmup`` steps. ``inverse_sqrt`` is the schedule of the Long
Range Arena baselines ("Long Range Arena: A Benchmark for Efficient Transformers"): warmup, then
lr * sqrt(warmup / step).
"""

from __future__ import annotations

import math

from efformer.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")


def lr_multiplier(name: str, step: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Factor in [0, 1] applied to the base lr at 0-based optimizer ``step`` of ``total`` steps."""
    if name not in SCHEDULES:
        raise ConfigError("train.schedule", name, f"one of {', '.join(SCHEDULES)}")
    s = step + 1  # the first update already uses a non-zero lr
    if warmup and s <= warmup:
        return s / warmup
    if name == "constant":
        return 1.0
    if name == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / s)
    progress = min(1.0, (s - warmup) / max(1, total - warmup))
    if name == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(cfg, step: int) -> float:
    """The learning rate of a TrainConfig at ``step``."""
    return cfg.lr * lr_multiplier(cfg.schedule, step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
