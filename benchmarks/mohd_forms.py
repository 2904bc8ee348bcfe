"""MoHD forward time, grouped (only the active sub-dimension slices) vs masked (dense masked matmuls), at a
few active fractions; evaluation mode, one thread by default.

    python benchmarks/mohd_forms.py [--d-model 512] [--groups 16] [--tokens 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from efformer.nn.mohd import MoHD


@torch.no_grad()
def seconds(m: MoHD, x: torch.Tensor, reps: int) -> float:
    """Mean seconds of one forward after a warm-up."""
    m(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        m(x)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    """Print one line per active fraction."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(1, a.tokens, a.d_model)
    for active in sorted({max(2, a.groups // 4), a.groups // 2, a.groups}):
        shared = active // 2 if active < a.groups else a.groups
        times = {}
        for form in ("grouped", "masked"):
            opts = dict(n_groups=a.groups, n_shared=shared, top_k=active - shared, form=form)
            times[form] = seconds(MoHD(a.d_model, 4.0, options=opts).eval(), x, a.reps)
        print(f"active {active}/{a.groups}: grouped {times['grouped'] * 1e3:.0f} ms, masked "
              f"{times['masked'] * 1e3:.0f} ms, grouped/masked {times['grouped'] / times['masked']:.2f}", flush=True)


if __name__ == "__main__":
    main()
