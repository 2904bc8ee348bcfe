"""Peers timed in the same run as efformer's mixers, so ratios to them come from one run.

``torch-sdpa`` (raw ``scaled_dot_product_attention`` with hand-written projections) is always
available. Other libraries are optional: when absent they are reported, never an error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from efformer.bench.cells import DTYPES
from efformer.benchmarks_raw import raw_attention_layer
from efformer.perf import time_ms

OPTIONAL = {"transformers": "transformers", "x-transformers": "x_transformers"}


def peer_status() -> dict[str, str]:
    """Each known peer and whether it can be timed here."""
    out = {"torch-sdpa": "available"}
    for name, module in OPTIONAL.items():
        found = importlib.util.find_spec(module) is not None
        out[name] = "installed, not yet wired into the sweep" if found else "not installed (optional)"
    return out


def time_sdpa_peer(seq_len: int, batch: int, d_model: int, n_heads: int, mode: str, causal: bool,
                   dtype: str = "float32", device: str = "cpu", repeat: int = 5) -> dict[str, Any]:
    """A bench row for raw SDPA with q/kv/out projections (what a user writes by hand)."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    layer = raw_attention_layer(d_model, n_heads, causal).to(device=device, dtype=dt)
    x = torch.randn(batch, seq_len, d_model, device=device, dtype=dt, requires_grad=mode == "fwdbwd")

    def fn():
        if mode == "fwdbwd":
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)

    row = {"mixer": "peer:torch-sdpa", "mode": mode, "seq_len": seq_len, "batch": batch, "d_model": d_model,
           "n_heads": n_heads, "dtype": dtype, "device": device, "causal": int(causal)}
    if mode not in ("fwd", "fwdbwd"):
        return row | {"status": "unsupported", "error": "peer rows cover fwd and fwdbwd"}
    return row | {"status": "ok", "time_ms": time_ms(fn, warmup=1, repeat=repeat, device=device)}
