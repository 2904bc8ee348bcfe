"""Prefill padded vs packed on a skewed length distribution, and split-KV vs SDPA decode at long context.

Packed prefill (efformer.models.packing) lays the sequences end to end in rows of ``--capacity``
tokens; padded prefill left-pads them to the longest. The ideal speed-up is the padded token count
over the packed one (about B * max_len / sum(len)). Split-KV decode times one query against a cache
of each ``--contexts`` length, against SDPA, and checks they agree. A script, not a test.

    python benchmarks/serve_prefill_split_kv.py --n-seqs 32 --max-len 512 --contexts 8192 65536
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from efformer.kernels.split_kv import split_kv_attention
from efformer.models.factory import create_model
from efformer.models.packing import pack_sequences


def timeit(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def skewed_lengths(n: int, max_len: int, seed: int) -> list[int]:
    """Lengths with a long tail: most short, a few near max_len (log-uniform in [8, max_len])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.rand(n, generator=g) * (torch.log(torch.tensor(max_len / 8.0)))) * 8
    lengths = lengths.long().clamp(1, max_len).tolist()
    lengths[0] = max_len  # the batch holds one longest sequence, as a real one does
    return lengths


@torch.no_grad()
def prefill(args) -> None:
    lengths = skewed_lengths(args.n_seqs, args.max_len, args.seed)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in lengths]
    print(f"prefill: {len(seqs)} sequences, sum {sum(lengths)} tokens, longest {max(lengths)}; ideal speed-up "
          f"{len(seqs) * max(lengths) / sum(lengths):.2f}x")
    print(f"{'mixer':<16}{'padded ms':>11}{'packed ms':>11}{'speed-up':>10}{'pad tokens':>12}{'packed tokens':>15}")
    for mixer, positional in (("softmax", "rope"), ("gated_deltanet", "none"), ("sliding_window", "rope")):
        torch.manual_seed(0)
        model = create_model("lm-tiny", mixer=mixer, positional=positional, d_model=args.d_model, n_layers=2,
                             n_heads=4, max_len=args.max_len).eval()
        n = max(lengths)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), True
        packed = pack_sequences(seqs, capacity=args.capacity or n)
        pmask = None if bool(packed.mask.all()) else packed.mask
        t_pad = timeit(partial(model, ids, mask=mask), args.repeats)
        t_pack = timeit(partial(model, packed.ids, segments=packed.segments, mask=pmask), args.repeats)
        print(f"{mixer:<16}{t_pad * 1e3:>11.1f}{t_pack * 1e3:>11.1f}{t_pad / t_pack:>9.2f}x{ids.numel():>12}"
              f"{packed.ids.numel():>15}")


@torch.no_grad()
def split_kv(args) -> None:
    print(f"\nsplit-KV decode: batch {args.batch}, 8 query heads over 2 kv heads, head dim 64, chunk {args.chunk}")
    print(f"{'context':>8}{'sdpa ms':>10}{'split ms':>10}{'ratio':>8}{'max |diff|':>12}")
    for t in args.contexts:
        q = torch.randn(args.batch, 8, 1, 64)
        k, v = torch.randn(args.batch, 2, t, 64), torch.randn(args.batch, 2, t, 64)
        t_sdpa = timeit(partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True), args.repeats)
        t_split = timeit(partial(split_kv_attention, q, k, v, chunk_size=args.chunk), args.repeats)
        diff = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                - split_kv_attention(q, k, v, chunk_size=args.chunk)).abs().max().item()
        print(f"{t:>8}{t_sdpa * 1e3:>10.2f}{t_split * 1e3:>10.2f}{t_sdpa / t_split:>7.2f}x{diff:>12.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-seqs", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--capacity", type=int, default=None, help="packed row length (default: the longest sequence)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    prefill(args)
    split_kv(args)


if __name__ == "__main__":
    main()
