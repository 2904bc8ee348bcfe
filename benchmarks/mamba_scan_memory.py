"""Peak memory and time of one Mamba layer's fwd+bwd by scan segment length, beside Mamba-2.

Each variant runs in a fresh process (Linux: peak RSS is reset through /proc/self/clear_refs after a warm-up,
so the figure is the step's own). ``checkpoint_every=K`` keeps one state per K steps (nn/selective_scan.py);
segment 0 means ``None``, the whole sequence as one segment.

    python benchmarks/mamba_scan_memory.py --length 4096 --segments 32 64 128 256 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def rss_mb(key: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def cell(name: str, options: dict, length: int, d_model: int) -> dict:
    """Peak extra MB and best of two fwd+bwd times for one layer (run inside a fresh worker)."""
    import torch

    from efformer.registry import MIXERS
    torch.manual_seed(0)
    m = MIXERS.get(name)(d_model, 4, causal=True, options=options)
    x = torch.randn(1, length, d_model, requires_grad=True)

    def step() -> float:
        t = time.perf_counter()
        y, _ = m(x)
        y.sum().backward()
        x.grad = None
        for p in m.parameters():
            p.grad = None
        return time.perf_counter() - t

    step()  # warm-up: allocator pools and lazy inits are not the step's memory
    base = rss_mb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    seconds = min(step(), step())
    return {"mixer": name, **options, "peak_mb": rss_mb("VmHWM") - base, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--segments", type=int, nargs="+", default=[32, 64, 128, 256, 0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, seg = args.worker.split(":")
        options = {} if name != "mamba" else {"checkpoint_every": int(seg) or None}
        print(json.dumps(cell(name, options, args.length, args.d_model)))
        return
    variants = [*(("mamba", k) for k in args.segments), ("mamba2", 0)]
    print(f"one layer, d_model {args.d_model}, batch 1, {args.length} tokens, fwd+bwd\n")
    print("| mixer | checkpoint_every | peak MB above baseline | time s |\n|---|---|---|---|")
    for name, seg in variants:
        out = subprocess.run([sys.executable, __file__, "--worker", f"{name}:{seg}", "--length", str(args.length),
                              "--d-model", str(args.d_model)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        seg = r.get("checkpoint_every", "-") or "one segment"
        print(f"| {r['mixer']} | {seg} | {r['peak_mb']:.0f} | {r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
