"""Peers timed in the same run as efformer's mixers, so ratios to them come from one run.

``torch-sdpa`` (raw ``scaled_dot_product_attention`` with hand-written projections) is always
available. Other libraries are optional: when absent they are reported, never an error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efformer.bench.cells import DTYPES
from efformer.bench.perf import time_ms


def raw_sdpa_attention(x: torch.Tensor, wq: torch.Tensor, wkv: torch.Tensor, wo: torch.Tensor, heads: int,
                       causal: bool) -> torch.Tensor:
    """q/kv/out projections by the given weights around ``scaled_dot_product_attention``: (b, n, d) -> (b, n, d)."""
    b, n, d = x.shape
    q = F.linear(x, wq).view(b, n, heads, d // heads).transpose(1, 2)
    k, v = F.linear(x, wkv).view(b, n, 2 * heads, d // heads).transpose(1, 2).chunk(2, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.linear(o.transpose(1, 2).reshape(b, n, d), wo)


class RawAttention(nn.Module):
    """q/kv/out projections around ``scaled_dot_product_attention``: (b, n, d) -> (b, n, d)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        self.h, self.causal = n_heads, causal
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, d) -> (b, n, d)."""
        return raw_sdpa_attention(x, self.q.weight, self.kv.weight, self.out.weight, self.h, self.causal)


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
    layer = RawAttention(d_model, n_heads, causal).to(device=device, dtype=dt)
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
