"""``efformer advise``: which mixers fit a sequence length and memory budget on this device, ranked
by measured (or extrapolated) speed, with arena accuracy where stored; one line of reason each."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from efformer.bench.analysis import estimate, fit_exponent, series
from efformer.errors import ConfigError
from efformer.registry import MIXERS


def parse_memory(text: str) -> float:
    """'8GB', '512MB', '1.5 GiB', '2048' (megabytes), '100B' -> megabytes; a ConfigError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m or (not m.group(2) and m.group(3) == "IB"):
        raise ConfigError("--memory", text, "a size like 8GB, 512MB or 1.5GiB")
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}.get(m.group(2), 1 / 1024**2 if m.group(3) else 1)
    mb = float(m.group(1)) * scale
    if mb <= 0:
        raise ConfigError("--memory", text, "a budget above zero, e.g. 8GB")
    return mb


@dataclass
class Advice:
    """One ranked recommendation."""

    mixer: str
    time_ms: float
    memory_mb: float | None
    extrapolated: bool
    accuracy: float | None
    reason: str


def advise(
    rows: list[dict[str, Any]], seq_len: int, memory_mb: float, *, causal: bool = False, decode: bool = False,
    accuracy: dict[str, float] | None = None,
) -> tuple[list[Advice], list[str]]:
    """(ranked advice for mixers that fit, one-line reasons for those left out)."""
    mode = "decode" if decode else "fwdbwd"
    if causal:  # a mixer's causal form can cost differently: only rows measured causally count
        rows = [r for r in rows if r.get("causal") in (1, True)]
    times, mems = series(rows, mode, "time_ms"), series(rows, mode, "peak_mem_mb")
    ranked, left_out = [], []
    for name in MIXERS.names():
        caps = MIXERS.get(name).capabilities
        reasons = caps.why_not(name, causal=True if causal else None, decode=decode)
        if reasons:
            left_out.append(f"{name}: {reasons[0]}")
            continue
        if name not in times:
            how = "causal " if causal else ""
            left_out.append(f"{name}: no {how}{mode} rows measured on this device (`efformer advise --run-missing`)")
            continue
        t = estimate(times[name], seq_len)
        m = estimate(mems[name], seq_len) if name in mems else None
        if t is None:
            left_out.append(f"{name}: too few measured lengths to extrapolate")
            continue
        mem = m[0] if m else None
        if mem is not None and mem > memory_mb:
            left_out.append(f"{name}: needs ~{mem:,.0f} MB at N={seq_len}, over the {memory_mb:,.0f} MB budget")
            continue
        k = fit_exponent([p[0] for p in times[name]], [p[1] for p in times[name]])
        span = f"{min(p[0] for p in times[name])}-{max(p[0] for p in times[name])}"
        how = f"extrapolated from N={span} (time ~ N^{k:.2f})" if t[1] else f"measured at N={seq_len}"
        acc = (accuracy or {}).get(name)
        reason = (f"{t[0]:,.1f} ms {mode} {how}; ~{mem:,.0f} MB; " if mem is not None else f"{t[0]:,.1f} ms; ") + (
            "exact softmax" if caps.exact else f"{caps.family}, approximate/other operator") + (
            f"; arena accuracy {acc:.1%}" if acc is not None else "")
        ranked.append(Advice(name, t[0], mem, t[1] or bool(m and m[1]), acc, reason))
    ranked.sort(key=lambda a: a.time_ms)
    return ranked, left_out


def arena_accuracy(store) -> dict[str, float]:
    """Mean arena test accuracy per mixer from the results store (empty if no arena runs)."""
    acc: dict[str, list[float]] = {}
    for run in store.runs():
        if run["kind"] != "arena":
            continue
        cfg = json.loads(run["config"])
        mixer = cfg.get("model", {}).get("mixer") or cfg.get("mixer")
        for e in store.evals(run["run_id"]):
            if e["split"] == "test" and e["metric"] == "accuracy" and isinstance(mixer, str):
                acc.setdefault(mixer, []).append(e["value"])
    return {k: sum(v) / len(v) for k, v in acc.items()}
