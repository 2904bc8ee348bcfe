"""Calibration for post-training compression: windows of calibration text, and observers of linear inputs.

Reusable by every compression method: ``calibration_windows`` cuts token ids (or UTF-8 bytes of text
files, for byte-level models) into windows; ``observe`` runs a model over them with forward pre-hooks
on chosen modules and feeds each module's input (flattened to (tokens, in_features)) to an observer:
``HessianObserver`` (GPTQ's H = 2/n sum x x^T), ``RangeObserver`` (per-channel min, max and absmax,
for SmoothQuant and OS+). ``stop_after`` ends each forward once a given module has run, so the
block-by-block methods do not pay for the layers above the one being calibrated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from efformer.errors import ConfigError, DataError, ShapeError


def read_text_ids(files: Iterable[str | os.PathLike]) -> Tensor:
    """The UTF-8 bytes of ``files`` joined by newlines, as token ids (n,) of a byte-level model."""
    parts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise DataError(f"calibration/text file {p} does not exist or is not a file; pass existing text files")
        parts.append(p.read_bytes())
    data = b"\n".join(parts)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)


def calibration_windows(ids: Tensor, seq_len: int, n_samples: int, seed: int = 0) -> Tensor:
    """``n_samples`` random windows (n_samples, seq_len) of the id stream ``ids`` (n,), as GPTQ samples them."""
    ids = torch.as_tensor(ids).flatten().long()
    if ids.numel() < seq_len:
        raise DataError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                        "give more text or a shorter --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def check_windows(calibration: object, method: str) -> None:
    """Refuse missing or malformed calibration windows for ``method`` (a LongTensor (n, seq) of token ids)."""
    if calibration is None:
        raise ConfigError("calibration", None, f"{method} needs calibration windows: a LongTensor (n, seq) of token "
                          "ids (see efformer.compress.calibration_windows)")
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long \
            or calibration.numel() == 0:
        raise ShapeError("calibration must be a non-empty LongTensor (n_windows, seq_len) of token ids, got "
                         f"{getattr(calibration, 'dtype', type(calibration).__name__)} "
                         f"{tuple(getattr(calibration, 'shape', ()))}")


class HessianObserver:
    """Running H = 2/n sum_t x_t x_t^T (in, in) in float64 over the n tokens seen."""

    def __init__(self):
        self.h: Tensor | None = None
        self.n = 0

    def __call__(self, x: Tensor) -> None:
        x = x.double()
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        self.h.add_(x.T @ x, alpha=2.0 / self.n)


class RangeObserver:
    """Per-channel min, max and absmax (in,) of the inputs seen."""

    def __init__(self):
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def __call__(self, x: Tensor) -> None:
        lo, hi = x.amin(0).float(), x.amax(0).float()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    @property
    def absmax(self) -> Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())


class _Stop(Exception):
    """Raised by the ``stop_after`` hook to end a calibration forward early."""


def _raise_stop(*_args) -> None:
    raise _Stop

@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], observers: dict[str, object], stop_after: nn.Module | None) -> Iterator:
    handles = []
    for name, mod in modules.items():
        obs = observers[name]
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, obs=obs: obs(args[0].detach().reshape(-1, args[0].shape[-1]))))
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(_raise_stop))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def observe(model: nn.Module, windows: Tensor, modules: dict[str, nn.Module], make_observer,
            batch_size: int = 8, stop_after: nn.Module | None = None) -> dict[str, object]:
    """Run ``model`` on ``windows`` (n, seq) and return one observer per module, fed that module's inputs."""
    observers = {name: make_observer() for name in modules}
    was_training = model.training
    model.eval()
    try:
        with _hooks(modules, observers, stop_after):
            for i in range(0, windows.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(windows[i:i + batch_size])
    finally:
        model.train(was_training)
    return observers
