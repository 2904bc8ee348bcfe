"""Greenformers' comparison, measured: one Transformer layer with SVD-factorized projections (Low-Rank Transformer)
vs a Linformer layer vs the full layer, time per training step as the sequence length grows.

Usage: ``python benchmarks/greenformers_crossover.py`` (``--quick`` for a smoke run). Each model is a
one-layer encoder classifier (d_model 256, 4 heads, GELU FFN x4; embeddings and the pooled head are
common to all three): "full" = softmax attention; "lrt" = the same with every attention and FFN linear
factorized to rank ``--rank`` (``efformer.compress.factorize``, method svd); "linformer" = the
``linformer`` mixer with keys/values projected to ``--k`` positions. A step is forward + backward +
AdamW update on a (``--batch``, N) batch; the median CPU time (``time.process_time``, one thread by
default, so other processes on a busy machine do not count) of ``--repeats`` steps after one warm-up. The
thesis' claim: LRT wins for short sequences (the projections dominate), Linformer for long ones (the
N^2 attention dominates); the printed crossover is the first N where Linformer is faster than LRT.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import efformer
from efformer.compress import FactorizeConfig, factorize


def build(kind: str, n: int, args) -> torch.nn.Module:
    """The one-layer model of ``kind`` for length ``n``."""
    torch.manual_seed(0)
    mixer = "linformer" if kind == "linformer" else "softmax"
    options = {"k": min(args.k, n)} if kind == "linformer" else {}
    model = efformer.create_model("classifier-tiny", d_model=args.d_model, n_layers=1, n_heads=4, ffn_mult=4.0,
                                  max_len=n, mixer=mixer, mixer_options=options)
    if kind == "lrt":
        factorize(model, FactorizeConfig(rank=args.rank))
    return model


def step_time(model: torch.nn.Module, n: int, args) -> float:
    """Median CPU seconds of one training step (forward, backward, AdamW) on a (batch, n) batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(1, 256, (args.batch, n))
    y = torch.randint(0, 2, (args.batch,))
    times = []
    for i in range(args.repeats + 1):
        t0 = time.process_time()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up (allocations, lazy init)
            times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--rank", type=int, default=64, help="LRT: rank of every factorized linear")
    p.add_argument("--k", type=int, default=128, help="Linformer: projected length")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a fair clock on a busy "
                   "machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.repeats = [64, 256], 1
    kinds = ("full", "lrt", "linformer")
    print(f"one layer, d_model {args.d_model}, batch {args.batch}; LRT rank {args.rank}, Linformer k {args.k}; "
          f"{torch.get_num_threads()} threads")
    params = {k: sum(p.numel() for p in build(k, args.lengths[0], args).backbone.parameters()) for k in kinds}
    print("layer parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()) +
          " (Linformer's E/F grow with max_len)")
    print("\n| N | full ms | LRT ms | Linformer ms | LRT / full | Linformer / full | Linformer / LRT |")
    print("|---|---|---|---|---|---|---|")
    cross = None
    for n in args.lengths:
        t = {k: step_time(build(k, n, args), n, args) for k in kinds}
        print(f"| {n} | {1e3 * t['full']:.1f} | {1e3 * t['lrt']:.1f} | {1e3 * t['linformer']:.1f} | "
              f"{t['lrt'] / t['full']:.2f} | {t['linformer'] / t['full']:.2f} | {t['linformer'] / t['lrt']:.2f} |",
              flush=True)
        if cross is None and t["linformer"] < t["lrt"]:
            cross = n
    print(f"\nLinformer first beats LRT at N = {cross}" if cross else "\nLinformer never beat LRT in this range")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
