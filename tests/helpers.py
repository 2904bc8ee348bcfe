"""Small helpers for tests: relative RMS error and mixer construction."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from efformer.registry import MIXERS


def rel_err(ref: Tensor, got: Tensor) -> float:
    """Relative RMS error ||ref - got|| / ||ref|| (the metric fla uses for kernel parity)."""
    ref, got = ref.double(), got.double()
    return ((ref - got).square().mean().sqrt() / (ref.square().mean().sqrt() + 1e-12)).item()


def make_mixer(name: str, causal: bool, d_model: int = 32, n_heads: int = 4, **options):
    """A mixer with its class's small test options (plus ``options``), in float32, eval mode."""
    cls = MIXERS.get(name)
    opts = {**cls.test_options, **options}
    torch.manual_seed(0)
    return cls(d_model, n_heads, causal=causal, options=opts).eval()


def with_form(mixer, form: str):
    """The same mixer (same weights) forced to run ``form``."""
    mixer.opts = mixer.opts.model_copy(update={"form": form})
    return mixer


def mixer_cases() -> list[tuple[str, bool]]:
    """(name, causal) for every registered mixer and every direction it supports."""
    cases = []
    for name in MIXERS.names():
        caps = MIXERS.get(name).capabilities
        if caps.causal:
            cases.append((name, True))
        if caps.bidirectional:
            cases.append((name, False))
    return cases


def case_id(case) -> str:
    return f"{case[0]}-{'causal' if case[1] else 'bidir'}"


class LargestTensor(TorchFunctionMode):
    """Context manager recording the largest tensor any torch function or tensor method returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
