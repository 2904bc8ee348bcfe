"""Model-level benchmark cells: one training step of a whole model (forward, backward, AdamW update).

The mixer-level :class:`~efformer.bench.cells.Cell` times one mixer alone; a :class:`ModelCell` times
what the Long Range Arena paper reports in its Table 2 ("Long Range Arena: A Benchmark for Efficient
Transformers"): training steps per second and peak memory of a 4-layer byte-level text classifier.
A ModelCell has ``key()``, ``device`` and ``run(peak)``, so ``efformer.bench.runner.sweep`` and
``measure_in_worker`` run it in a fresh worker like any mixer cell (timeouts and OOM become rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from efformer.bench.cells import DTYPES, measure
from efformer.errors import ConfigError
from efformer.models import create_model
from efformer.registry import MIXERS

MODEL_MODES = ("train_step",)

# The LRA byte-level Text classifier (repo config text_classification, Table 2): 4 layers, d 256,
# 4 heads, MLP 1024, byte vocabulary, 2 classes; mean pooling as in the efformer classifier preset.
LRA_TEXT = dict(d_model=256, n_heads=4, n_layers=4, ffn_mult=4.0, vocab_size=256, n_classes=2)


@dataclass(frozen=True)
class ModelCell:
    """What to measure: training steps of a sequence classifier with one mixer at one length and batch."""

    mixer: str
    seq_len: int
    batch: int = 2
    mode: str = "train_step"
    d_model: int = LRA_TEXT["d_model"]
    n_heads: int = LRA_TEXT["n_heads"]
    n_layers: int = LRA_TEXT["n_layers"]
    ffn_mult: float = LRA_TEXT["ffn_mult"]
    vocab_size: int = LRA_TEXT["vocab_size"]
    n_classes: int = LRA_TEXT["n_classes"]
    preset: str = "classifier-tiny"  # positional, norm, ffn kind and pooling come from this preset
    dtype: str = "float32"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # mixer options; max_len is set to seq_len
    lr: float = 1e-4
    repeat: int = 3
    warmup: int = 1
    flops: bool = True  # count the FLOPs of one step (costs one extra step)

    def __post_init__(self):
        if self.mode not in MODEL_MODES:
            raise ConfigError("mode", self.mode, f"one of {', '.join(MODEL_MODES)}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.seq_len <= 0 or self.batch <= 0:
            raise ConfigError("seq_len/batch", (self.seq_len, self.batch), "positive integers")
        if self.repeat <= 0:
            raise ConfigError("repeat", self.repeat, "a positive number of timed steps")
        MIXERS.get(self.mixer)  # unknown names fail here, with a suggestion

    def unsupported_reason(self) -> str | None:
        """Why this cell cannot run (a classifier needs a bidirectional mixer), or None."""
        reasons = MIXERS.get(self.mixer).capabilities.why_not(self.mixer, causal=False)
        if reasons:
            return reasons[0]
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def key(self) -> dict[str, Any]:
        """The identifying columns of the cell's row (unknown columns land in the store's ``extra``)."""
        return dict(mixer=self.mixer, mode=self.mode, seq_len=self.seq_len, batch=self.batch, d_model=self.d_model,
                    n_heads=self.n_heads, dtype=self.dtype, device=self.device, causal=0, n_layers=self.n_layers,
                    ffn_mult=self.ffn_mult, preset=self.preset, options=dict(self.options))

    def build(self) -> torch.nn.Module:
        """The classifier, seeded, on the cell's device and dtype; max_len is the cell's length."""
        torch.manual_seed(0)
        model = create_model(
            self.preset, task="classifier", mixer=self.mixer, mixer_options=dict(self.options), max_len=self.seq_len,
            pooling="mean", **{k: getattr(self, k) for k in LRA_TEXT},
        )
        return model.to(device=self.device, dtype=DTYPES[self.dtype])

    def run(self, peak_gflops: float | None = None) -> dict[str, Any]:
        """Measure in this process: median step time, steps/s, FLOPs, GFLOP/s; a complete result row."""
        row = self.key() | {"status": "ok", "time_ms": None, "steps_per_s": None, "flops": None, "gflops": None,
                            "peak_fraction": None}
        reason = self.unsupported_reason()
        if reason:
            return row | {"status": "unsupported", "error": reason}
        try:
            model = self.build().train()
            row["n_params"] = sum(p.numel() for p in model.parameters())
            step = self._step(model)
        except torch.OutOfMemoryError as e:
            return row | {"status": "oom", "error": str(e).splitlines()[0]}
        oom = measure(step, row, self.device, self.warmup, self.repeat, flops=self.flops)
        if oom:
            return row | oom
        row["steps_per_s"] = 1e3 / row["time_ms"]
        if row["flops"]:
            row["gflops"] = row["flops"] / (row["time_ms"] * 1e-3) / 1e9
            if peak_gflops:
                row["peak_fraction"] = row["gflops"] / peak_gflops
        return row

    def _step(self, model: torch.nn.Module):
        """A zero-argument training step on fixed random bytes and labels: forward, loss, backward, AdamW."""
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (self.batch, self.seq_len), generator=g).to(self.device)
        labels = torch.randint(0, self.n_classes, (self.batch,), generator=g).to(self.device)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(ids).float(), labels).backward()
            opt.step()
        return step
