"""Time chunkwise gated linear attention, forward + backward: torch chunked vs step loop vs Triton.

Prints one row per (length, form): milliseconds, and GFLOP/s of a nominal FLOP count (the chunked
algorithm at chunk 64, backward counted as twice the forward) beside a dense matmul peak measured
in the same run. A script, not a test: nothing here is asserted.

    python benchmarks/bench_chunk_gla.py --lengths 256 1024 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from efformer.kernels.chunk_gla import chunk_gla, gla_recurrent, triton_runs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of an (n, n) @ (n, n) matmul here."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, device, repeats) / 1e9


def nominal_flops(b: int, h: int, t: int, dk: int, dv: int, chunk: int = 64) -> float:
    """Forward + backward FLOPs of the chunked algorithm: intra-chunk scores and A@V, q@S, state update."""
    fwd = b * h * t * (2 * chunk * (dk + dv) + 4 * dk * dv)
    return 3 * fwd


def main() -> None:
    """Parse arguments, time every form at every length, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (oversubscribed cores distort timings)")
    p.add_argument("--recurrent-max-len", type=int, default=1024, help="skip the step loop above this length")
    args = p.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    if dtype == torch.float32 and dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # compare with the fp32 (ieee) kernel fairly
    peak = matmul_peak(dev, dtype, 2048 if dev.startswith("cuda") else 512, args.repeats)
    forms = {
        "chunked (torch)": lambda *a: chunk_gla(*a, chunk_size=args.chunk, backend="torch"),
        "recurrent (torch)": gla_recurrent,
    }
    if triton_runs(dev):
        forms["triton"] = lambda *a: chunk_gla(*a, backend="triton")
    print(f"device={dev} dtype={args.dtype} B={args.batch} H={args.heads} K={args.dk} V={args.dv}")
    print(f"matmul peak: {peak:,.0f} GFLOP/s")
    print(f"{'T':>6} | {'form':<18} | {'fwd+bwd ms':>10} | {'GFLOP/s':>9} | {'% peak':>6}")
    for t in args.lengths:
        torch.manual_seed(0)
        q, k = (torch.randn(args.batch, args.heads, t, args.dk, device=dev, dtype=dtype) for _ in range(2))
        v = torch.randn(args.batch, args.heads, t, args.dv, device=dev, dtype=dtype)
        g = torch.nn.functional.logsigmoid(torch.randn_like(q)) / 16
        ins = [x.requires_grad_() for x in (q * args.dk**-0.5, k, v, g)]
        flops = nominal_flops(args.batch, args.heads, t, args.dk, args.dv)
        for name, fn in forms.items():
            if name.startswith("recurrent") and t > args.recurrent_max_len:
                continue

            def step(fn=fn, ins=ins):
                o, s = fn(*ins)
                torch.autograd.grad(o.float().sum() + s.sum(), ins)

            sec = timeit(step, dev, args.repeats)
            rate = flops / sec / 1e9
            print(f"{t:>6} | {name:<18} | {sec * 1e3:>10.2f} | {rate:>9.1f} | {100 * rate / peak:>5.1f}%")


if __name__ == "__main__":
    main()
