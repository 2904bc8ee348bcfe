"""Analysis of stored bench rows: scaling exponents, crossovers with softmax, plots and a report.

Everything here reads rows (dicts from the results store) only, so a report can always be rebuilt
from the SQLite file alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def latest_ok(rows: list[Row]) -> dict[tuple[str, str, int], Row]:
    """The newest successful row per (mixer, mode, seq_len)."""
    out: dict[tuple[str, str, int], Row] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("time_ms"):
            out[(r["mixer"], r["mode"], int(r["seq_len"]))] = r
    return out


# A power law fitted to fewer lengths says nothing (two points always fit exactly), and one whose
# log-log R² is low is noise: such fits are refused or flagged, never reported as a bare exponent.
MIN_FIT_LENGTHS = 3
MIN_FIT_R2 = 0.9


@dataclass(frozen=True)
class PowerFit:
    """A fit of value ~ c * N^exponent on log-log axes: the exponent (None if refused) and its R²."""

    exponent: float | None
    r2: float | None
    n_lengths: int

    @property
    def problem(self) -> str | None:
        """Why the exponent should not be trusted (too few lengths, poor fit), or None."""
        if self.exponent is None:
            return f"needs ≥ {MIN_FIT_LENGTHS} lengths (has {self.n_lengths})"
        if self.r2 is not None and self.r2 < MIN_FIT_R2:
            return f"poor fit (R² {self.r2:.2f} < {MIN_FIT_R2})"
        return None

    @property
    def ok(self) -> bool:
        """Whether the exponent is trustworthy."""
        return self.problem is None

    def label(self) -> str:
        """'2.00', '1.31 (poor fit, R² 0.42)' or 'n/a: needs ≥ 3 lengths', for tables."""
        if self.exponent is None:
            return f"n/a: needs ≥ {MIN_FIT_LENGTHS} lengths"
        k = f"{round(self.exponent, 2) + 0.0:.2f}"  # + 0.0 turns a rounded -0.0 into 0.00
        return k if self.ok else f"{k} (poor fit, R² {self.r2:.2f})"


def fit_power_law(lengths: list[float], values: list[float]) -> PowerFit:
    """Least-squares slope of log(value) on log(length) and its R²; refused below MIN_FIT_LENGTHS lengths."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(lengths, values, strict=True) if v and v > 0]
    n_lengths = len({p[0] for p in pts})
    if n_lengths < MIN_FIT_LENGTHS:
        return PowerFit(None, None, n_lengths)
    x, y = np.array(pts).T
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 if ss_tot <= 1e-12 else 1.0 - ss_res / ss_tot  # a flat series is fitted exactly by slope 0
    return PowerFit(float(slope), r2, n_lengths)


def fit_exponent(lengths: list[float], values: list[float]) -> float | None:
    """Slope of log(value) on log(length): 1 for linear growth, 2 for quadratic; None if < 3 lengths.

    Use :func:`fit_power_law` to also get the fit's R² (and whether it is poor)."""
    return fit_power_law(lengths, values).exponent


def series(rows: list[Row], mode: str, column: str = "time_ms") -> dict[str, list[tuple[int, float]]]:
    """Per mixer, the sorted (seq_len, value) points of ``column`` for ``mode``."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (mixer, m, n), r in sorted(latest_ok(rows).items()):
        if m == mode and r.get(column) is not None:
            out[mixer].append((n, float(r[column])))
    return dict(out)


def exponents(rows: list[Row], mode: str) -> dict[str, dict[str, PowerFit]]:
    """Per mixer: the power-law fit of time and of memory vs length for ``mode``."""
    t, m = series(rows, mode, "time_ms"), series(rows, mode, "peak_mem_mb")
    return {
        mixer: {
            "time": fit_power_law([p[0] for p in pts], [p[1] for p in pts]),
            "memory": fit_power_law([p[0] for p in m.get(mixer, [])], [p[1] for p in m.get(mixer, [])]),
        }
        for mixer, pts in t.items()
    }


def crossover(baseline: list[tuple[int, float]], other: list[tuple[int, float]]) -> float | None:
    """Smallest length where ``other`` becomes faster than ``baseline`` (log-log interpolation).

    Returns the first measured length if ``other`` is already faster there, None if it never is.
    """
    base = dict(baseline)
    common = sorted(n for n, _ in other if n in base)
    prev = None
    for n in common:
        diff = math.log(dict(other)[n]) - math.log(base[n])
        if diff < 0:
            if prev is None:
                return float(n)
            (n0, d0) = prev
            frac = d0 / (d0 - diff)  # where the log-difference crosses zero between n0 and n
            return float(math.exp(math.log(n0) + frac * (math.log(n) - math.log(n0))))
        prev = (n, diff)
    return None


def estimate(points: list[tuple[int, float]], n: int) -> tuple[float, bool] | None:
    """Value at length ``n``: measured if present, else extrapolated by the fitted power law.

    None when the fit cannot be trusted (too few lengths or a poor fit): see :func:`fit_power_law`."""
    d = dict(points)
    if n in d:
        return d[n], False
    fit = fit_power_law([p[0] for p in points], [p[1] for p in points])
    if not fit.ok:
        return None
    n0, v0 = min(points, key=lambda p: abs(math.log(p[0]) - math.log(n)))
    return v0 * (n / n0) ** fit.exponent, True


def plot(rows: list[Row], mode: str, path: str | Path) -> Path:
    """Log-log PNG of time and memory vs length, one line per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, column, label in ((axes[0], "time_ms", "time (ms)"), (axes[1], "peak_mem_mb", "peak memory (MB)")):
        for mixer, pts in sorted(series(rows, mode, column).items()):
            ns, vs = zip(*pts, strict=True)
            ax.loglog(ns, vs, marker="o", label=mixer, lw=2.5 if mixer == "softmax" else 1.2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs length ({mode})")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(rows: list[Row], out_dir: str | Path, baseline: str = "softmax") -> Path:
    """Markdown report (tables per mode, exponents, crossovers) plus PNG plots, from rows alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devices = sorted({r["device"] for r in rows})
    lines = ["# efformer bench report", "", f"Device(s): {', '.join(devices)}", ""]
    peaks = sorted({round(r["matmul_peak_gflops"], 1) for r in rows if r.get("matmul_peak_gflops")})
    if peaks:
        lines += [f"Matmul peak measured in the same run(s): {', '.join(map(str, peaks))} GFLOP/s", ""]
    lines += [f"Exponents are log-log least-squares fits over ≥ {MIN_FIT_LENGTHS} lengths; an R² below {MIN_FIT_R2} "
              "is marked poor fit, fewer lengths are n/a.", ""]
    bad = [r for r in rows if r.get("status") not in ("ok", "unsupported")]
    modes = [m for m in ("fwd", "fwdbwd", "prefill", "decode") if any(r["mode"] == m for r in rows)]
    for mode in modes:
        t = series(rows, mode)
        lengths = sorted({n for pts in t.values() for n, _ in pts})
        if not lengths:
            continue
        lines += [f"## {mode}: time (ms), ratio to {baseline} in brackets", ""]
        lines.append("| mixer | " + " | ".join(f"N={n}" for n in lengths) + " | time exp. | mem exp. | faster than "
                     f"{baseline} from N |")
        lines.append("|---" * (len(lengths) + 4) + "|")
        ex = exponents(rows, mode)
        base = dict(t.get(baseline, []))
        for mixer, pts in sorted(t.items()):
            d = dict(pts)
            cells = []
            for n in lengths:
                if n not in d:
                    cells.append("—")
                elif n in base and mixer != baseline:
                    cells.append(f"{d[n]:.1f} ({d[n] / base[n]:.2f}x)")
                else:
                    cells.append(f"{d[n]:.1f}")
            e = ex.get(mixer, {})
            cx = crossover(t.get(baseline, []), pts) if mixer != baseline and baseline in t else None
            fmt = lambda f: "—" if f is None else f.label()  # noqa: E731
            lines.append(f"| {mixer} | " + " | ".join(cells) + f" | {fmt(e.get('time'))} | {fmt(e.get('memory'))} | "
                         + ("—" if cx is None else f"{cx:.0f}") + " |")
        lines.append("")
        png = plot(rows, mode, out / f"scaling_{mode}.png")
        lines += [f"![{mode} scaling]({png.name})", ""]
    if bad:
        lines += ["## Cells that did not finish", "", "| mixer | mode | N | status | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['mixer']} | {r['mode']} | {r['seq_len']} | {r['status']} | {str(r.get('error', ''))[:80]} |"
                  for r in bad]
        lines.append("")
    path = out / "bench_report.md"
    path.write_text("\n".join(lines))
    return path
