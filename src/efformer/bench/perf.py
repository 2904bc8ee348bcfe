"""Timing helpers shared by benchmarks: median wall time and a matmul peak measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def rss_kb(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status in kB (VmRSS now, VmHWM peak); 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS counter (VmHWM) so that it measures from now on (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7, device="cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak_gflops(size: int = 1024, dtype: torch.dtype = torch.float32, device="cpu") -> float:
    """Achieved GFLOP/s of a square matmul: the practical peak that other figures are compared with."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    ms = time_ms(lambda: a @ b, warmup=3, repeat=9, device=device)
    return 2 * size**3 / (ms * 1e-3) / 1e9


def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, causal: bool = False) -> float:
    """Forward FLOPs of the two attention matmuls: 4*B*H*Nq*Nk*D (halved when causal)."""
    f = 4.0 * batch * heads * n_q * n_k * head_dim
    return f / 2 if causal else f
