"""How close batch-1 greedy decoding runs to this machine's memory-bandwidth roofline.

At batch 1 each new token reads every weight once, so tokens/s can never exceed
bandwidth / weight bytes. This script measures the bandwidth (a large tensor sum, the same
threads) and efformer's (and, when installed, ``transformers``') decode tokens/s on the
Llama-style model of ``bench_peers_generate.py``, and prints each as a fraction of that bound —
the headroom any decode-speed target has left.

    python benchmarks/bench_decode_roofline.py            # d 512, 8 layers, vocab 32000
    python benchmarks/bench_decode_roofline.py --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_peers_generate import _hf_generate, efformer_model, hf_model  # noqa: E402


def bandwidth_gbs(mb: int = 512, rounds: int = 5) -> float:
    """Read bandwidth in GB/s: the best of ``rounds`` sums over an ``mb``-MB float32 tensor."""
    x = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def tokens_per_s(generate, ids: torch.Tensor, new: int, rounds: int = 3) -> float:
    """Decode tokens/s of ``generate(ids, new)``, the prefill subtracted (best of ``rounds``)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        generate(ids, 1)
        t1 = time.perf_counter()
        generate(ids, new + 1)
        best = min(best, (time.perf_counter() - t1) - (t1 - t0))
    return new / best


def main(argv=None) -> int:
    """Parse flags, measure, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model and few tokens, to check the script")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64, help="new tokens per timed generate")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    d, layers, vocab, new = (128, 2, 1000, 8) if a.quick else (512, 8, 32000, a.new)
    ef = efformer_model(d, layers, max(1, d // 64), vocab, 2048)
    weight_bytes = sum(t.numel() * t.element_size() for t in ef.parameters())
    bw = bandwidth_gbs(64 if a.quick else 512)
    bound = bw * 1e9 / weight_bytes
    ids = torch.randint(0, vocab, (1, 32))
    rows = {"efformer": tokens_per_s(lambda i, n: ef.generate(i, max_new_tokens=n), ids, new)}
    if importlib.util.find_spec("transformers"):
        hf = hf_model(ef, 2048)
        rows["transformers"] = tokens_per_s(lambda i, n: _hf_generate(hf, i, n), ids, new)
    print(f"weights {weight_bytes / 2**20:.1f} MiB; read bandwidth {bw:.1f} GB/s; "
          f"roofline {bound:.0f} tokens/s at batch 1")
    print("| library | tokens/s | of roofline |\n|---|---|---|")
    for name, tps in rows.items():
        print(f"| {name} | {tps:.1f} | {100 * tps / bound:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
