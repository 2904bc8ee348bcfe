"""The efformer softmax mixer vs the same computation hand-written around raw SDPA, side by side.

"raw" is the bare minimum a user would write: q/kv/out projections with the mixer's own weights
around ``scaled_dot_product_attention``. "efformer" is ``SoftmaxAttention(form="fast")`` called
normally: input checks, form dispatch, mask logic, head split/merge. Their ratio is the wrapper's
cost. GFLOP/s count the attention matmuls plus projections, against a matmul peak measured in the
same run.

    python benchmarks/bench_softmax_vs_sdpa.py [--lengths 512 1024 2048 4096 8192] [--causal]
"""

from __future__ import annotations

import argparse

import torch

from efformer.bench.peers import raw_sdpa_attention
from efformer.bench.perf import attention_flops, matmul_peak_gflops, time_ms
from efformer.mixers.softmax import SoftmaxAttention


def raw_attention(m: SoftmaxAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Projections + SDPA + output projection written by hand with ``m``'s weights."""
    return raw_sdpa_attention(x, m.q_proj.weight, m.kv_proj.weight, m.out_proj.weight, m.n_heads, causal)


def main() -> None:
    """Run the sweep and print the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    d = a.heads * a.head_dim
    m = SoftmaxAttention(d, a.heads, causal=a.causal, options={"form": "fast"})
    peak = matmul_peak_gflops()
    print(f"matmul peak on this device: {peak:.1f} GFLOP/s (fp32 1024^3, same run)")
    print(f"batch={a.batch} heads={a.heads} head_dim={a.head_dim} causal={a.causal} threads={torch.get_num_threads()}")
    hdr = f"{'N':>6} {'mode':>7} {'raw ms':>9} {'efformer ms':>12} {'ratio':>6} {'GFLOP/s':>8} {'of peak':>8}"
    print(hdr)
    print("-" * len(hdr))
    for n in a.lengths:
        x = torch.randn(a.batch, n, d)
        flops = attention_flops(a.batch, a.heads, n, n, a.head_dim, a.causal) + 2 * a.batch * n * d * 4 * d
        for mode in ("fwd", "fwd+bwd"):
            xg = x.clone().requires_grad_(mode == "fwd+bwd")

            def raw(xg=xg, mode=mode):
                o = raw_attention(m, xg, a.causal)
                if mode == "fwd+bwd":
                    o.sum().backward()

            def ours(xg=xg, mode=mode):
                y, _ = m(xg)
                if mode == "fwd+bwd":
                    y.sum().backward()

            # interleave the two so that machine noise hits both alike
            t_raw, t_ours = [], []
            for _ in range(2):
                t_raw.append(time_ms(raw, warmup=1, repeat=a.repeat))
                t_ours.append(time_ms(ours, warmup=1, repeat=a.repeat))
            r, o = min(t_raw), min(t_ours)
            f = flops * (3.0 if mode == "fwd+bwd" else 1.0)  # backward does about twice the forward's matmuls
            g = f / (o * 1e-3) / 1e9
            print(f"{n:>6} {mode:>7} {r:>9.2f} {o:>12.2f} {o / r:>6.3f} {g:>8.1f} {g / peak:>8.1%}")


if __name__ == "__main__":
    main()
