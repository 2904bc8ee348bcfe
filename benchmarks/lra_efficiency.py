"""The shape of Long Range Arena Table 2 on this machine: training steps/s and peak memory vs length.

"Long Range Arena: A Benchmark for Efficient Transformers" (Tay et al., ICLR 2021), Table 2, times the
4-layer byte-level Text classifier (d 256, 4 heads, MLP 1024) at N = 1K..4K. Here each (mixer, N) is one
training step (forward, backward, AdamW) of that model with every registered bidirectional mixer, run
in a fresh worker process (peak memory from VmHWM; timeouts and OOM recorded as rows, not crashes).
The batch is scaled down to fit a CPU. Ratios are to softmax measured in the same run, printed beside
the paper's ratios. Rows go to the results store (mode "train_step").

    python benchmarks/lra_efficiency.py                       # the full table (slow: run on a quiet machine)
    python benchmarks/lra_efficiency.py --quick --mixers softmax linear   # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import os
import sys

from efformer.bench.analysis import fit_exponent
from efformer.bench.model_cells import LRA_TEXT, ModelCell
from efformer.bench.runner import sweep
from efformer.registry import MIXERS
from efformer.results import DEFAULT_PATH, ResultsStore

BASELINE = "softmax"
PAPER_LENGTHS = (1024, 2048, 3072, 4096)

# LRA paper, Table 2 (byte-level Text, batch 32, 4x4 TPU v3), as transcribed in
# /work/shared/reference/long-range-arena.md §3.2: steps/s, the speed-up vs the Transformer printed in
# brackets, and peak GB per device, each at 1K, 2K, 3K, 4K. (The Synthesizer 3K entry "6.6 (2.9x)" is
# as transcribed and looks inconsistent with its neighbours.)
PAPER_TABLE2: dict[str, tuple[str, tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = {
    "softmax": ("Transformer", (8.1, 4.9, 2.3, 1.4), (1.0, 1.0, 1.0, 1.0), (0.85, 2.65, 5.51, 9.48)),
    "local": ("Local Attention", (9.2, 8.4, 7.4, 7.4), (1.1, 1.7, 3.2, 5.3), (0.42, 0.76, 1.06, 1.37)),
    "linformer": ("Linformer", (9.3, 9.1, 8.5, 7.7), (1.2, 1.9, 3.7, 5.5), (0.37, 0.55, 0.99, 0.99)),
    "reformer": ("Reformer", (4.4, 2.2, 1.5, 1.1), (0.5, 0.4, 0.7, 0.8), (0.48, 0.99, 1.53, 2.28)),
    "sinkhorn": ("Sinkhorn Trans.", (9.1, 7.9, 6.6, 5.3), (1.1, 1.6, 2.9, 3.8), (0.47, 0.83, 1.13, 1.48)),
    "synthesizer_dense": ("Synthesizer", (8.7, 5.7, 6.6, 1.9), (1.1, 1.2, 2.9, 1.4), (0.65, 1.98, 4.09, 6.99)),
    "bigbird": ("BigBird", (7.4, 3.9, 2.7, 1.5), (0.9, 0.8, 1.2, 1.1), (0.77, 1.49, 2.18, 2.88)),
    "linear": ("Linear Trans.", (9.1, 9.3, 8.6, 7.8), (1.1, 1.9, 3.7, 5.6), (0.37, 0.57, 0.80, 1.03)),
    "performer": ("Performer", (9.5, 9.4, 8.7, 8.0), (1.2, 1.9, 3.8, 5.7), (0.37, 0.59, 0.82, 1.06)),
}
# In the paper's model list but not timed (emulated with masks, LRA App. B.2).
PAPER_NOT_TIMED = {"sparse_transformer": "Sparse Trans.", "longformer": "Longformer"}

QUICK = dict(lengths=[64, 128], batch=1, d_model=32, n_layers=1, repeat=1)


def paper_ratios(mixer: str) -> tuple[str, str]:
    """The paper's speed-ups and memory ratios to the Transformer at 1K/2K/3K/4K, as text."""
    if mixer in PAPER_NOT_TIMED:
        return "not timed", "not timed"
    if mixer not in PAPER_TABLE2:
        return "—", "—"
    _, _, speedups, mem = PAPER_TABLE2[mixer]
    base_mem = PAPER_TABLE2[BASELINE][3]
    speed = "/".join(f"{x:.1f}" for x in speedups)
    memory = "/".join(f"{m / b:.2f}" for m, b in zip(mem, base_mem, strict=True))
    return speed, memory


def _cell_text(row: dict | None, column: str, base: dict | None, fmt: str, invert: bool = False) -> str:
    if row is None:
        return "—"
    if row.get("status") != "ok" or row.get(column) is None:
        return str(row.get("status"))
    text = format(row[column], fmt)
    if base is not None and base.get("status") == "ok" and base.get(column) and row["mixer"] != BASELINE:
        text += f" ({row[column] / base[column]:.2f}x)"
    return text


def _md(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def tables(rows: list[dict], lengths: list[int]) -> str:
    """Markdown: steps/s and peak memory per mixer and length, ratios to softmax, exponents, paper ratios."""
    by = {(r["mixer"], int(r["seq_len"])): r for r in rows}
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    mixers.sort(key=lambda m: (m != BASELINE, m))
    speed, memory = [], []
    for m in mixers:
        ok = [by[(m, n)] for n in lengths if by.get((m, n), {}).get("status") == "ok"]
        t_exp = fit_exponent([r["seq_len"] for r in ok], [r["time_ms"] for r in ok])
        m_exp = fit_exponent([r["seq_len"] for r in ok], [r.get("peak_mem_mb") for r in ok])
        p_speed, p_mem = paper_ratios(m)
        speed.append([m] + [_cell_text(by.get((m, n)), "steps_per_s", by.get((BASELINE, n)), ".3g") for n in lengths]
                     + ["—" if t_exp is None else f"{t_exp:.2f}", p_speed])
        memory.append([m] + [_cell_text(by.get((m, n)), "peak_mem_mb", by.get((BASELINE, n)), ".0f") for n in lengths]
                      + ["—" if m_exp is None else f"{m_exp:.2f}", p_mem])
    ns = [f"N={n}" for n in lengths]
    out = [
        f"### Training steps/s (speed-up vs {BASELINE} in brackets)", "",
        _md(["mixer", *ns, "time exp.", "paper speed-up 1K/2K/3K/4K"], speed), "",
        f"### Peak memory, MB (ratio to {BASELINE} in brackets)", "",
        _md(["mixer", *ns, "mem exp.", "paper memory ratio 1K/2K/3K/4K"], memory),
    ]
    bad = [r for r in rows if r.get("status") not in ("ok",)]
    if bad:
        out += ["", "Cells that did not finish: " + "; ".join(
            f"{r['mixer']} N={r['seq_len']}: {r['status']} ({str(r.get('error', ''))[:60]})" for r in bad)]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", nargs="+", default=None, help="default: every registered bidirectional mixer")
    p.add_argument("--lengths", type=int, nargs="+", default=list(PAPER_LENGTHS))
    p.add_argument("--batch", type=int, default=2, help="the paper used 32 on 16 TPU cores; scaled down to fit")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per cell (median), after one warm-up step")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per cell before it is recorded as timeout")
    p.add_argument("--mem-cap-gb", type=float, default=None, help="address-space cap per cell")
    p.add_argument("--softmax-form", default="auto", choices=["auto", "fast", "reference"],
                   help="the baseline's form: auto/fast is fused SDPA (O(N) memory); reference materialises N x N "
                        "scores like the paper's Transformer")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", default=str(DEFAULT_PATH))
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke run: {QUICK}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sweep, store the rows, print the tables; returns the rows."""
    args = parse_args(argv)
    sizes = dict(LRA_TEXT)
    lengths, batch, repeat = args.lengths, args.batch, args.repeat
    if args.quick:
        sizes.update(d_model=QUICK["d_model"], n_layers=QUICK["n_layers"])
        lengths, batch, repeat = QUICK["lengths"], QUICK["batch"], QUICK["repeat"]
    if args.threads:
        os.environ["EFFORMER_BENCH_THREADS"] = str(args.threads)  # read by each worker
    mixers = args.mixers or [m for m in MIXERS.names() if MIXERS.get(m).capabilities.bidirectional]
    if BASELINE not in mixers:
        mixers = [BASELINE, *mixers]  # ratios need the baseline from the same run
    cells = []
    for n in lengths:  # short lengths first: the cheap half of the table arrives early
        for m in sorted(mixers, key=lambda m: (m != BASELINE, m)):
            # Every mixer runs with its default options; the model sets max_len (Linformer's E/F, the
            # Synthesizer's logits, Sinkhorn's sorting net, cosFormer's M) to N.
            opts = {"form": args.softmax_form} if m == BASELINE and args.softmax_form != "auto" else {}
            cells.append(ModelCell(m, n, batch=batch, repeat=repeat, options=opts, device=args.device, **sizes))
    print(f"LRA Table 2 shape: {len(mixers)} mixers x N={lengths}, batch {batch}, d_model {sizes['d_model']}, "
          f"{sizes['n_layers']} layers, {repeat} timed steps per cell", file=sys.stderr)
    store = ResultsStore(args.store)
    sweep_id, rows = sweep(cells, store, timeout_s=args.timeout, mem_cap_gb=args.mem_cap_gb)
    print(f"## LRA Table 2 shape on {rows[0]['device']} (sweep {sweep_id}, rows in {args.store})\n")
    print(f"Model: {sizes['n_layers']} layers, d_model {sizes['d_model']}, {sizes['n_heads']} heads, ffn x"
          f"{sizes['ffn_mult']:g}, byte vocab, mean pooling; batch {batch}; fp32; softmax form {args.softmax_form}. "
          "Paper: batch 32 on a 4x4 TPU v3; its memory is GB per device.\n")
    print(tables(rows, lengths))
    return rows


if __name__ == "__main__":
    main()
