"""Chunked linear-recurrent mixers against softmax attention: fwd+bwd time, peak memory, % of matmul peak.

One layer (d_model 256, 4 heads, batch 1, causal), every cell in a fresh worker process so peak memory
is that cell's alone; the matmul peak is measured in the same run. Prints one markdown table per length
with each mixer's time and peak memory as ratios to softmax's (SDPA) and its fraction of the peak.

    python benchmarks/chunked_cpu.py --lengths 4096 16384
    python benchmarks/chunked_cpu.py --lengths 4096 --mixers gla retnet --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from efformer.bench.cells import Cell
from efformer.bench.runner import sweep
from efformer.results import ResultsStore

MIXERS = ("softmax", "linear", "gla", "simple_gla", "retnet", "deltanet", "gated_deltanet", "mamba2", "mamba")


def table(rows: list[dict], n: int) -> str:
    """Markdown rows for length ``n``: time, memory, ratios to softmax, % of the matmul peak."""
    by = {r["mixer"]: r for r in rows if r["seq_len"] == n}
    base = by.get("softmax", {})
    out = [f"N = {n} (matmul peak {rows[0]['matmul_peak_gflops']:.1f} GFLOP/s)", "",
           "| mixer | time ms | time / softmax | peak MB | mem / softmax | % peak |", "|---|---|---|---|---|---|"]
    for m, r in by.items():
        if r["status"] != "ok":
            out.append(f"| {m} | {r['status']} | | | | |")
            continue
        t, mem = r["time_ms"], r.get("peak_mem_mb")
        tr = t / base["time_ms"] if base.get("time_ms") else float("nan")
        mr = mem / base["peak_mem_mb"] if base.get("peak_mem_mb") and mem is not None else float("nan")
        pf = 100 * (r.get("peak_fraction") or 0)
        out.append(f"| {m} | {t:.0f} | {tr:.2f}x | {mem:.0f} | {mr:.2f}x | {pf:.0f}% |")
    return "\n".join(out)


def main() -> None:
    """Parse flags, run the sweep, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--mixers", nargs="+", default=list(MIXERS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args()
    if "softmax" not in a.mixers:
        a.mixers = ["softmax", *a.mixers]
    cells = [Cell(m, "fwdbwd", n, causal=True, repeat=a.repeat) for n in a.lengths for m in a.mixers]
    with tempfile.TemporaryDirectory() as tmp:
        _, rows = sweep(cells, ResultsStore(str(Path(tmp) / "rows.sqlite")), timeout_s=a.timeout, progress=False)
    for n in a.lengths:
        print(table(rows, n), end="\n\n")


if __name__ == "__main__":
    main()
