"""LightTransfer's streaming conversion without training: held-out perplexity and decode time per token.

Trains a small byte-level LM on the Shakespeare texts (``--data``, default ``../shared/data/shakespeare``
beside the repository), then converts the lazy half of its layers (most attention mass on the first
``--sink`` tokens plus the last ``--window``) to sink + window attention, and all layers for contrast,
and prints held-out perplexity at ``--seq`` tokens and the time of one decode step after a ``--context``
token prefill (bounded cache vs full KV cache).

Run: ``python benchmarks/bench_stream_convert.py`` (``--steps 100 --context 1024`` for a short check).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import efformer
from efformer.interop import stream_convert

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def load_bytes(folder: Path) -> torch.Tensor:
    """Every .txt file under ``folder`` as one byte tensor."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        sys.exit(f"no .txt files under {folder}; pass --data FOLDER")
    return torch.frombuffer(bytearray(b"\n".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()


def batches(data: torch.Tensor, seq: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows (batch, seq + 1) of ``data``."""
    start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq + 1] for s in start.tolist()])


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq: int, n: int) -> float:
    """exp(mean next-byte cross-entropy) over ``n`` fixed held-out windows of ``seq`` bytes."""
    model.eval()
    stride = max(1, (len(data) - seq - 1) // n)
    windows = torch.stack([data[i * stride : i * stride + seq + 1] for i in range(n)])
    losses = [F.cross_entropy(model(w[None, :-1])[0], w[1:]).item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def decode_ms(model, context: int, steps: int = 8) -> float:
    """Milliseconds per decode step after a ``context``-token prefill (median of ``steps``)."""
    model.eval()
    ids = torch.randint(0, 256, (1, context))
    cache = model.new_cache(1)
    model(ids, cache=cache, logits_to_keep=1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(ids[:, -1:], cache=cache)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> int:
    """Train, convert, measure; print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_bytes(args.data)
    split = int(0.95 * len(data))
    train, held = data[:split], data[split:]
    model = efformer.create_model("lm-tiny", d_model=args.d_model, n_layers=args.layers, n_heads=4,
                                  max_len=max(args.context, args.seq) + 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        model.train()
        b = batches(train, args.seq, 16, gen)
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: train loss {loss.item():.3f}", flush=True)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s\n")
    sample = held[: args.seq][None]
    half, report, masses = stream_convert(model, sample, 0.5, args.sink, args.window)
    every, _, _ = stream_convert(model, sample, 1.0, args.sink, args.window)
    print("attention mass on sink + window per layer: " + ", ".join(f"{m:.3f}" for m in masses))
    print(f"lazy layers converted: {report.layers}\n")
    print(f"| model | held-out ppl (seq {args.seq}) | decode ms/token at {args.context} context |")
    print("|---|---|---|")
    for name, m in (("original (softmax)", model), (f"lazy half -> sink {args.sink} + window {args.window}", half),
                    ("all layers -> sink + window", every)):
        print(f"| {name} | {perplexity(m, held, args.seq, args.eval_windows):.3f} | "
              f"{decode_ms(m, args.context):.2f} |", flush=True)
    print(f"\nno training after conversion; fp32, {args.threads} threads, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
