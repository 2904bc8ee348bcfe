"""Do sparsity masks speed anything up on CPU? Dense vs masked (50%, 2:4) matmul time, and torch's semi-structured
(2:4) sparse tensors where they run; the low-rank factors for contrast (they really remove FLOPs).

Usage: ``python benchmarks/sparsity_speed.py`` (``--quick`` for a smoke run). Times ``x @ W^T`` for x
(tokens, in) and W (out, in) at the shapes of the Shakespeare LM's FFN (1024 x 256, 256 x 512) and a
square one, median CPU time (``time.process_time``, one thread by default) of ``--repeats``. A masked
W is the same dense tensor with zeros: the same time is expected. ``torch.sparse.to_sparse_semi_structured``
needs CUDA kernels (cuSPARSELt/CUTLASS); on CPU we report what it says.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from efformer.compress.lowrank import svd_factors
from efformer.compress.sparsity import nm_mask, unstructured_mask


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds of each ``fns[name]()``, interleaved round by round so no variant pays for going first."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def semi_structured(w: torch.Tensor, x: torch.Tensor, repeats: int) -> str:
    """The time of a 2:4 semi-structured sparse matmul, or why it cannot run here."""
    try:
        from torch.sparse import to_sparse_semi_structured
        sparse = to_sparse_semi_structured(w * nm_mask(w.abs()))
        return f"{1e3 * timed({'s': lambda: torch.nn.functional.linear(x, sparse)}, repeats)['s']:.2f} ms"
    except Exception as e:  # noqa: BLE001 - we report whatever the backend says
        return f"not on CPU ({type(e).__name__}: {str(e).splitlines()[0][:60]})"


def row(out_f: int, in_f: int, args) -> str:
    """One table row: dense time, then masked / factorized / semi-structured against it."""
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f)
    x = torch.randn(args.tokens, in_f)
    half = w * unstructured_mask(w.abs(), 0.5)
    two4 = w * nm_mask(w.abs())
    b, a = svd_factors(w, in_f // 4)
    t = timed({"dense": lambda: x @ w.T, "half": lambda: x @ half.T, "2:4": lambda: x @ two4.T,
               "low": lambda: (x @ a.T) @ b.T}, args.repeats)
    dense, t_half, t_24, t_low = t["dense"], t["half"], t["2:4"], t["low"]
    return (f"| {out_f} x {in_f} | {1e3 * dense:.2f} | {t_half / dense:.2f} | {t_24 / dense:.2f} | "
            f"{t_low / dense:.2f} | {semi_structured(w, x, args.repeats)} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is a fair clock on a busy "
                   "machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(1024, 256), (256, 512), (512, 512)]
    if args.quick:
        shapes, args.repeats, args.tokens = shapes[:1], 3, 256
    print(f"x: ({args.tokens}, in) float32, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("\n| W (out x in) | dense ms | 50% masked / dense | 2:4 masked / dense | rank in/4 factors / dense | "
          "semi-structured 2:4 |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        print(row(out_f, in_f, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
