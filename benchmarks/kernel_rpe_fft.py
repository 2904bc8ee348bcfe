"""Time kernelized attention with RPE: the explicit Toeplitz form vs the FFT form, forward only.

Prints one row per length: milliseconds of each form and of exact softmax attention (SDPA) at the
same width, and the FFT form's speed-up over the explicit one (below 1: slower). It is the
measurement behind ``KernelRPE.reference_below``. A script, not a test: nothing here is asserted.

    python benchmarks/kernel_rpe_fft.py --lengths 256 1024 4096 --features 256 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from efformer.registry import MIXERS


def timeit(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Parse arguments and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    top = max(a.lengths)
    kw = dict(causal=a.causal, max_len=top)
    rpe = MIXERS.get("kernel_rpe")(a.d_model, a.heads, options={"n_features": a.features}, **kw).to(a.device).eval()
    sdpa = MIXERS.get("softmax")(a.d_model, a.heads, options={"form": "fast"}, **kw).to(a.device).eval()
    print(f"| N | explicit ms | FFT ms | softmax ms | FFT speed-up |  (m={a.features}, d_model={a.d_model}, "
          f"heads={a.heads}, batch={a.batch}, {'causal' if a.causal else 'bidirectional'}, {a.device})")
    print("|---|---|---|---|---|")
    for n in a.lengths:
        x = torch.randn(a.batch, n, a.d_model, device=a.device)
        ms = {}
        with torch.no_grad():
            for form in ("reference", "fast"):
                rpe.opts = rpe.opts.model_copy(update={"form": form})
                ms[form] = timeit(lambda x=x: rpe(x), a.device, a.repeats) * 1e3
            ms["softmax"] = timeit(lambda x=x: sdpa(x), a.device, a.repeats) * 1e3
        print(f"| {n} | {ms['reference']:.1f} | {ms['fast']:.1f} | {ms['softmax']:.1f} | "
              f"{ms['reference'] / ms['fast']:.2f} |")


if __name__ == "__main__":
    main()
