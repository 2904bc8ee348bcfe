"""Linear-recurrent and state-space mixers beside softmax attention: scaling, decode latency, GFLOP/s.

Three measurements, every cell in a fresh worker process (timeouts and OOM are recorded as rows):
(a) forward + backward time and peak memory vs sequence length, with the fitted exponent per mixer;
(b) per-token decode latency at a short and a long context, and their ratio (flat, <= 1.2, expected
    for recurrent state; growing for softmax attention's KV cache);
(c) achieved GFLOP/s of each mixer's training form (the chunkwise form where it has one) against a
    matmul peak measured in the same run.
All mixers run causally, as in a language model. Rows go to the results store (modes "fwdbwd", "decode").

    python benchmarks/recurrent_scaling.py                  # the full figures (slow: run on a quiet machine)
    python benchmarks/recurrent_scaling.py --quick --mixers gla mamba   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from efformer.bench.analysis import fit_exponent
from efformer.bench.cells import Cell
from efformer.bench.runner import sweep
from efformer.registry import MIXERS
from efformer.results import DEFAULT_PATH, ResultsStore

BASELINE = "softmax"
FAMILY = ("retnet", "gla", "simple_gla", "deltanet", "gated_deltanet", "mamba", "mamba2", "s4d", "aaren", "linear",
          "performer", "cosformer")
FLAT_RATIO = 1.2  # issue 5: decode latency at the long context within 1.2x of the short one
QUICK = dict(lengths=[64, 128], contexts=[16, 64], d_model=32, repeat=1, decode_repeat=3)


def options_for(mixer: str, longest_position: int) -> dict[str, Any]:
    """Options that let ``mixer`` run up to ``longest_position`` (cosFormer's M must exceed every position)."""
    if "max_len" in MIXERS.get(mixer).Options.model_fields:
        return {"max_len": longest_position}
    return {}


def training_form(cell: Cell) -> str:
    """The form the cell's mixer runs for a full-sequence training pass ("auto" resolved on its device)."""
    m = MIXERS.get(cell.mixer)(cell.d_model, cell.n_heads, causal=True, options=dict(cell.options))
    # resolve at the cell's own length: "auto" runs the reference form below a mixer's reference_below
    return m.resolve_form(torch.zeros(1, cell.seq_len, cell.d_model, device=cell.device), None)


def _md(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _ordered(rows: list[dict]) -> list[str]:
    return sorted(dict.fromkeys(r["mixer"] for r in rows), key=lambda m: (m != BASELINE, m))


def scaling_tables(rows: list[dict], lengths: list[int], forms: dict[str, str]) -> str:
    """(a) fwd+bwd time and peak memory per mixer and length, ratio to softmax, fitted exponents."""
    rows = [r for r in rows if r["mode"] == "fwdbwd"]
    by = {(r["mixer"], int(r["seq_len"])): r for r in rows}
    t_body, m_body = [], []
    for m in _ordered(rows):
        ok = [by[(m, n)] for n in lengths if by.get((m, n), {}).get("status") == "ok"]
        t_cells, m_cells = [], []
        for n in lengths:
            r, base = by.get((m, n)), by.get((BASELINE, n))
            if r is None or r.get("status") != "ok":
                t_cells.append("—" if r is None else r["status"])
                m_cells.append("—" if r is None else r["status"])
                continue
            both = m != BASELINE and base is not None and base.get("status") == "ok"
            t_cells.append(f"{r['time_ms']:.1f}" + (f" ({r['time_ms'] / base['time_ms']:.2f}x)" if both else ""))
            mem, bmem = r.get("peak_mem_mb"), (base or {}).get("peak_mem_mb")
            m_cells.append(_fmt(mem, ".0f") + (f" ({mem / bmem:.2f}x)" if both and mem and bmem else ""))
        ns = [r["seq_len"] for r in ok]
        t_body.append([m, forms.get(m, "?"), *t_cells, _fmt(fit_exponent(ns, [r["time_ms"] for r in ok]))])
        m_body.append([m, *m_cells, _fmt(fit_exponent(ns, [r.get("peak_mem_mb") for r in ok]))])
    hdr = [f"N={n}" for n in lengths]
    return "\n".join([
        f"### (a) forward + backward time, ms (ratio to {BASELINE} in brackets)", "",
        _md(["mixer", "form", *hdr, "time exp."], t_body), "",
        f"### (a) forward + backward peak memory, MB (ratio to {BASELINE} in brackets)", "",
        _md(["mixer", *hdr, "mem exp."], m_body),
    ])


def decode_table(rows: list[dict], contexts: list[int]) -> str:
    """(b) per-token decode latency at each context and the ratio longest/shortest context."""
    rows = [r for r in rows if r["mode"] == "decode"]
    by = {(r["mixer"], int(r["seq_len"])): r for r in rows}
    lo, hi = min(contexts), max(contexts)
    body = []
    for m in _ordered(rows):
        cells = [by.get((m, c)) for c in contexts]
        texts = ["—" if r is None else (f"{r['time_ms']:.3f}" if r.get("status") == "ok" else r["status"])
                 for r in cells]
        a, b = by.get((m, lo)), by.get((m, hi))
        ratio = b["time_ms"] / a["time_ms"] if a and b and a.get("status") == b.get("status") == "ok" else None
        verdict = "—" if ratio is None else ("flat" if ratio <= FLAT_RATIO else "grows")
        body.append([m, *texts, _fmt(ratio), verdict])
    return "\n".join([
        f"### (b) decode latency per token, ms, at context N (flat: ratio <= {FLAT_RATIO})", "",
        _md(["mixer", *[f"N={c}" for c in contexts], f"ratio {hi}/{lo}", "verdict"], body),
    ])


def gflops_table(rows: list[dict], lengths: list[int], forms: dict[str, str]) -> str:
    """(c) achieved GFLOP/s of the fwd+bwd pass and its fraction of the matmul peak of the same run."""
    rows = [r for r in rows if r["mode"] == "fwdbwd"]
    by = {(r["mixer"], int(r["seq_len"])): r for r in rows}
    peaks = sorted({round(r["matmul_peak_gflops"], 1) for r in rows if r.get("matmul_peak_gflops")})
    body = []
    for m in _ordered(rows):
        cells = []
        for n in lengths:
            r = by.get((m, n))
            ok = r is not None and r.get("status") == "ok" and r.get("gflops") is not None
            cells.append(f"{r['gflops']:.1f} ({100 * (r.get('peak_fraction') or 0):.0f}%)" if ok
                         else ("—" if r is None else r["status"]))
        body.append([m, forms.get(m, "?"), *cells])
    return "\n".join([
        f"### (c) fwd+bwd GFLOP/s (% of the matmul peak: {', '.join(map(str, peaks))} GFLOP/s, same run)", "",
        _md(["mixer", "form", *[f"N={n}" for n in lengths]], body),
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", nargs="+", default=list(FAMILY), help="softmax is always added as the baseline")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192], help="decode contexts for (b)")
    p.add_argument("--parts", nargs="+", default=["scaling", "decode"], choices=["scaling", "decode"],
                   help="scaling: tables (a) and (c); decode: table (b)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="timed fwd+bwd calls per cell (median)")
    p.add_argument("--decode-repeat", type=int, default=50, help="timed single-token steps per decode cell")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per cell before it is recorded as timeout")
    p.add_argument("--mem-cap-gb", type=float, default=None, help="address-space cap per cell")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", default=str(DEFAULT_PATH))
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke run: {QUICK}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweeps, store the rows, print the tables; returns the rows."""
    args = parse_args(argv)
    lengths, contexts, d_model = args.lengths, args.contexts, args.d_model
    repeat, decode_repeat = args.repeat, args.decode_repeat
    if args.quick:
        lengths, contexts, d_model = QUICK["lengths"], QUICK["contexts"], QUICK["d_model"]
        repeat, decode_repeat = QUICK["repeat"], QUICK["decode_repeat"]
    if args.threads:
        os.environ["EFFORMER_BENCH_THREADS"] = str(args.threads)  # read by each worker
    mixers = sorted(dict.fromkeys([BASELINE, *args.mixers]), key=lambda m: (m != BASELINE, m))
    common = dict(batch=args.batch, d_model=d_model, n_heads=args.heads, device=args.device, causal=True)
    cells = []
    if "scaling" in args.parts:
        cells += [Cell(m, "fwdbwd", n, repeat=repeat, options=options_for(m, n), **common)
                  for n in lengths for m in mixers]
    if "decode" in args.parts:
        # the context plus every step the cell takes (first call, FLOP count, warm-up, timed) must fit max_len
        cells += [Cell(m, "decode", c, repeat=decode_repeat, options=options_for(m, c + decode_repeat + 8), **common)
                  for c in contexts for m in mixers]
    n0 = min(lengths)
    forms = {m: training_form(Cell(m, "fwdbwd", n0, options=options_for(m, n0), **common)) for m in mixers}
    print(f"recurrent scaling: {len(mixers)} mixers, N={lengths}, decode contexts {contexts}, d_model {d_model}, "
          f"{len(cells)} cells", file=sys.stderr)
    store = ResultsStore(args.store)
    sweep_id, rows = sweep(cells, store, timeout_s=args.timeout, mem_cap_gb=args.mem_cap_gb)
    print(f"## Recurrent and state-space mixers on {rows[0]['device']} (sweep {sweep_id}, rows in {args.store})\n")
    print(f"Causal, batch {args.batch}, d_model {d_model}, {args.heads} heads, fp32.\n")
    if "scaling" in args.parts:
        print(scaling_tables(rows, lengths, forms) + "\n")
    if "decode" in args.parts:
        print(decode_table(rows, contexts) + "\n")
    if "scaling" in args.parts:
        print(gflops_table(rows, lengths, forms))
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        print("\nCells that did not finish: " + "; ".join(
            f"{r['mixer']} {r['mode']} N={r['seq_len']}: {r['status']} ({str(r.get('error', ''))[:60]})"
            for r in bad))
    return rows


if __name__ == "__main__":
    main()
