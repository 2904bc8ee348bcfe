"""One benchmark cell: a mixer, a mode, a length, a batch, a dtype — timed, counted and measured.

Modes: ``fwd`` (forward, no grad), ``fwdbwd`` (forward + backward), ``prefill`` (causal forward
that builds the decode state), ``decode`` (one-token steps at a context of ``seq_len``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from efformer.bench.perf import sync, time_ms
from efformer.errors import ConfigError
from efformer.registry import MIXERS

MODES = ("fwd", "fwdbwd", "prefill", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Cell:
    """What to measure: one mixer at one length, batch, mode and dtype on one device."""

    mixer: str
    mode: str
    seq_len: int
    batch: int = 1
    d_model: int = 256
    n_heads: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool | None = None  # None: causal if the mode needs it or the mixer is causal-only
    options: dict[str, Any] = field(default_factory=dict)
    repeat: int = 5
    warmup: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.seq_len <= 0 or self.batch <= 0:
            raise ConfigError("seq_len/batch", (self.seq_len, self.batch), "positive integers")
        MIXERS.get(self.mixer)  # unknown names fail here, with a suggestion

    def resolved_causal(self) -> bool:
        """Causal for prefill/decode and causal-only mixers; else bidirectional if supported."""
        caps = MIXERS.get(self.mixer).capabilities
        if self.causal is not None:
            return self.causal
        return self.mode in ("prefill", "decode") or not caps.bidirectional

    def unsupported_reason(self) -> str | None:
        """Why this cell cannot run, or None."""
        caps = MIXERS.get(self.mixer).capabilities
        reasons = caps.why_not(self.mixer, causal=self.resolved_causal(), decode=self.mode in ("prefill", "decode"),
                               dtype=self.dtype)
        if reasons:
            return "; ".join(reasons)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def key(self) -> dict[str, Any]:
        """The identifying columns of the cell's row."""
        d = dataclasses.asdict(self)
        d["causal"] = int(self.resolved_causal())
        for k in ("options", "repeat", "warmup"):
            d.pop(k)
        return d


# The CPU SDPA kernel has no formula in torch's FLOP counter; count it like the GPU kernels.
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_bwd_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_flops() -> dict:
    ops = torch.ops.aten
    mapping = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[ops._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_bwd_flops
    return mapping


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention kernels)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as fc:
        fn()
    return int(fc.get_total_flops())


def _build(cell: Cell):
    cls = MIXERS.get(cell.mixer)
    max_len = cell.seq_len + 1  # as a model passes its max_len
    torch.manual_seed(0)
    m = cls(cell.d_model, cell.n_heads, causal=cell.resolved_causal(), options=dict(cell.options), max_len=max_len)
    return m.to(device=cell.device, dtype=DTYPES[cell.dtype])


def _workload(cell: Cell, m):
    """A zero-argument function doing one unit of the cell's work (plus any untimed setup)."""
    dev, dt = cell.device, DTYPES[cell.dtype]
    x = torch.randn(cell.batch, cell.seq_len, cell.d_model, device=dev, dtype=dt)
    if cell.mode == "fwd":
        def fwd():
            with torch.no_grad():
                m(x)
        return fwd
    if cell.mode == "fwdbwd":
        xg = x.requires_grad_(True)

        def fwdbwd():
            y, _ = m(xg)
            y.sum().backward()
        return fwdbwd
    if cell.mode == "prefill":
        def prefill():
            with torch.no_grad():
                m(x, state=m.init_state(cell.batch, dev, dt))
        return prefill
    with torch.no_grad():  # decode: fill a context of seq_len tokens once, then time single steps
        state = m.init_state(cell.batch, dev, dt)
        _, state = m(x, state=state)
    tok = torch.randn(cell.batch, 1, cell.d_model, device=dev, dtype=dt)
    holder = {"state": state}

    def decode():
        with torch.no_grad():
            _, holder["state"] = m(tok, state=holder["state"])
    return decode


def measure(work, row: dict[str, Any], device: str, warmup: int, repeat: int, flops: bool = True) -> dict | None:
    """Time ``work`` into ``row`` (first call, FLOPs, median time); an out-of-memory status dict, or None."""
    try:
        t0 = time.perf_counter()
        work()  # the first call also compiles/allocates (optimizer state, caches); excluded from timing below
        sync(device)
        row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        if flops:
            row["flops"] = count_flops(work)
        row["time_ms"] = time_ms(work, warmup=warmup, repeat=repeat, device=device)
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "error": str(e).splitlines()[0]}
    except RuntimeError as e:
        if "out of memory" in str(e).lower() or "not enough memory" in str(e).lower():
            return {"status": "oom", "error": str(e).splitlines()[0]}
        raise
    return None


def run_cell(cell: Cell, peak_gflops: float | None = None) -> dict[str, Any]:
    """Measure ``cell`` in this process: median time, FLOPs, GFLOP/s; a complete result row."""
    row = cell.key() | {"status": "ok", "time_ms": None, "flops": None, "gflops": None, "peak_fraction": None}
    reason = cell.unsupported_reason()
    if reason:
        return row | {"status": "unsupported", "error": reason}
    try:
        m = _build(cell).eval()
        work = _workload(cell, m)
    except torch.OutOfMemoryError as e:
        return row | {"status": "oom", "error": str(e).splitlines()[0]}
    oom = measure(work, row, cell.device, cell.warmup, cell.repeat)
    if oom:
        return row | oom
    if row["flops"] and row["time_ms"]:
        row["gflops"] = row["flops"] / (row["time_ms"] * 1e-3) / 1e9
        if peak_gflops:
            row["peak_fraction"] = row["gflops"] / peak_gflops
    return row
