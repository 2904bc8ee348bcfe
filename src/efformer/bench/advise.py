"""``efformer advise``: which mixers fit a sequence length and memory budget on this device, ranked
by measured (or extrapolated) speed, with arena accuracy where stored; one line of reason each."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from efformer.bench.analysis import PowerFit, estimate, fit_power_law, series
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


# Outside these ranges a fitted exponent is noise (e.g. time falling with length), not a scaling law,
# so nothing is extrapolated from it.
TIME_EXPONENT_RANGE = (0.5, 3.0)
MEMORY_EXPONENT_RANGE = (0.0, 2.5)


@dataclass
class Advice:
    """One ranked recommendation."""

    mixer: str
    time_ms: float
    memory_mb: float | None
    extrapolated: bool
    accuracy: float | None
    reason: str


def _fit_problem(what: str, fit: PowerFit, bounds: tuple[float, float]) -> str | None:
    """Why ``fit`` must not be extrapolated from, or None."""
    if fit.problem:
        return f"{what} fit {fit.problem}"
    lo, hi = bounds
    if not lo <= fit.exponent <= hi:
        return f"{what} ~ N^{fit.exponent:.2f} is outside the plausible range [{lo:g}, {hi:g}]"
    return None


def _distance(points: list[tuple[int, float]], n: int) -> str:
    """How far ``n`` lies from the measured lengths, e.g. '×4 beyond the longest measured length 4096'."""
    lengths = sorted(p[0] for p in points)
    if n > lengths[-1]:
        return f"×{n / lengths[-1]:.3g} beyond the longest measured length {lengths[-1]}"
    if n < lengths[0]:
        return f"×{lengths[0] / n:.3g} below the shortest measured length {lengths[0]}"
    below = max(m for m in lengths if m < n)
    return f"interpolated between the measured lengths {below} and {min(m for m in lengths if m > n)}"


def _at_length(points: list[tuple[int, float]], n: int, what: str,
               bounds: tuple[float, float]) -> tuple[float, str | None, PowerFit | None] | str:
    """(value at ``n``, extrapolation note or None if measured, fit or None), or why it is not extrapolated."""
    if n in dict(points):
        return dict(points)[n], None, None
    fit = fit_power_law([p[0] for p in points], [p[1] for p in points])
    problem = _fit_problem(what, fit, bounds)
    if problem:
        span = f"{min(p[0] for p in points)}-{max(p[0] for p in points)}"
        return f"not extrapolated: {problem} (measured N={span})"
    est = estimate(points, n)
    assert est is not None  # the fit was checked above
    return est[0], _distance(points, n), fit


def advise(
    rows: list[dict[str, Any]], seq_len: int, memory_mb: float, *, causal: bool = False, decode: bool = False,
    accuracy: dict[str, float] | None = None,
) -> tuple[list[Advice], list[str]]:
    """(ranked advice for mixers that fit, one-line reasons for those left out).

    A value at an unmeasured length is extrapolated only from a trustworthy power-law fit (≥ 3 lengths,
    R² ≥ 0.9) whose exponent is plausible (TIME_EXPONENT_RANGE, MEMORY_EXPONENT_RANGE); other mixers are
    left out as "not extrapolated: <reason>", and every extrapolated row says how far it reaches."""
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
        t = _at_length(times[name], seq_len, "time", TIME_EXPONENT_RANGE)
        m = _at_length(mems[name], seq_len, "memory", MEMORY_EXPONENT_RANGE) if name in mems else None
        refused = next((got for got in (t, m) if isinstance(got, str)), None)
        if refused:
            left_out.append(f"{name}: {refused}")
            continue
        t_ms, t_note, t_fit = t
        mem = m[0] if m else None
        if mem is not None and mem > memory_mb:
            left_out.append(f"{name}: needs ~{mem:,.0f} MB at N={seq_len}, over the {memory_mb:,.0f} MB budget")
            continue
        how = (f"measured at N={seq_len}" if t_note is None else
               f"extrapolated {t_note} (time ~ N^{t_fit.exponent:.2f}, R² {t_fit.r2:.2f})")
        if m and m[1] is not None:
            how += f"; memory extrapolated (~ N^{m[2].exponent:.2f})"
        acc = (accuracy or {}).get(name)
        reason = f"{t_ms:,.1f} ms {mode} {how}; " + (f"~{mem:,.0f} MB; " if mem is not None else "") + (
            "exact softmax" if caps.exact else f"{caps.family}, approximate/other operator") + (
            f"; arena accuracy {acc:.1%}" if acc is not None else "")
        ranked.append(Advice(name, t_ms, mem, t_note is not None or bool(m and m[1] is not None), acc, reason))
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
