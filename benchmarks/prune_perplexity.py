"""Structured pruning of the Shakespeare byte-level LM: held-out perplexity, parameters and generate
tokens/s for FFN-neuron pruning (20/40/60% of the neurons) by magnitude, Wanda, Taylor, AMP and OPTIN,
for head pruning, and for depth pruning (1 of 4 blocks) with and without FuseGPT fusion.

Usage: ``python benchmarks/prune_perplexity.py --model /tmp/lm-shakespeare-ref`` (an efformer model
folder; ``benchmarks/train_shakespeare_lm.py`` trains one). Protocol, kept small so the whole script
runs in minutes on a busy 2-core machine: calibration = ``--n-samples`` random windows of
``--seq-len`` bytes of the training plays (every play but the two validation ones, the training
split); evaluation = ``--max-windows`` windows of ``--seq-len`` bytes evenly spaced through the validation
plays (othello, richard_iii) after their first 5% (the Project Gutenberg header), each scored on its
own; tokens/s = greedy ``generate`` of ``--new-tokens`` tokens from a
32-byte prompt with the KV cache, batch 1, best of 3. No fine-tuning except FuseGPT's fusion steps
(and ``--recover``, a hook for recovery fine-tuning such as LoRA: each entry of RECOVERY maps
(pruned model, calibration windows, args) -> recovered model, and every row is re-measured after it).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from lowrank_perplexity import recover  # the LoRA recovery recipe (sibling script)
from train_shakespeare_lm import DATA, split  # the same split as training (sibling script)

import efformer
from efformer.compress import calibration_windows, fuse, importance, prune, remove_lora
from efformer.compress.evaluate import perplexity
from efformer.compress.prune import count_params


def lora_recovery(model, train, args):
    """LoRA recovery (lowrank_perplexity's recipe: rank ``--lora-rank`` on every block linear, ``--recover-steps``
    trainer steps of ``--batch`` x ``--seq-len`` training bytes), merged back so the row keeps the pruned shapes."""
    lora_args = argparse.Namespace(lora_rank=args.lora_rank, steps=args.recover_steps, batch=args.batch,
                                   seq=args.seq_len, lr=args.lr)
    model = copy.deepcopy(model)  # the original row's model is pruned afterwards: train a copy
    recover(model, train, lora_args)
    return remove_lora(model)  # merged


# Recovery fine-tuning after pruning, by name: (pruned model, training-split ids, args) -> model.
RECOVERY = {"none": lambda model, train, args: model, "lora": lora_recovery}


@torch.no_grad()
def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Best of 3 greedy cached generations of ``new_tokens`` tokens (batch 1)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens)
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="/tmp/lm-shakespeare-ref")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--fuse-steps", type=int, default=30)
    p.add_argument("--methods", default="magnitude,wanda,taylor,amp,optin")
    p.add_argument("--recover", default="none", choices=sorted(RECOVERY))
    p.add_argument("--recover-steps", type=int, default=100, help="lora recovery: trainer steps")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="lora recovery: windows per step")
    p.add_argument("--lr", type=float, default=2e-3, help="lora recovery: learning rate")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = efformer.load(args.model).eval()
    train, val = split(Path(args.data))
    calib = calibration_windows(train, args.seq_len, args.n_samples, seed=0)
    step = (val.numel() - val.numel() // 20 - args.seq_len) // args.max_windows
    starts = [val.numel() // 20 + k * step for k in range(args.max_windows)]
    val = torch.cat([val[s:s + args.seq_len] for s in starts])  # stride = window: each chunk is one window
    prompt = val[:32][None]
    recover_fn = RECOVERY[args.recover]
    rows = []
    start = time.perf_counter()

    def row(name: str, m, seconds: float = 0.0) -> None:
        m = recover_fn(m, train, args).eval()
        ppl = perplexity(m, val, args.seq_len, max_windows=args.max_windows)
        r = dict(name=name, params=count_params(m), ppl=ppl, tps=tokens_per_second(m, prompt, args.new_tokens),
                 seconds=seconds)
        rows.append(r)
        print(f"[{time.perf_counter() - start:6.0f}s] {name}: ppl {ppl:.3f}, {r['params']:,} params", file=sys.stderr,
              flush=True)

    row("original", model)
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        sc = importance.scores(model, method, "neurons", calib)
        t_score = time.perf_counter() - t0
        for removed in (0.2, 0.4, 0.6):
            t1 = time.perf_counter()
            res = prune(model, method, "neurons", f"units={1 - removed:.1f}", calib, scores=sc)
            widths = "/".join(map(str, res.model.cfg.layer_ffn_hidden))
            row(f"neurons -{removed:.0%} {method} ({widths})", res.model, t_score + time.perf_counter() - t1)
    for method in ("magnitude", "wanda", "taylor", "optin"):
        t0 = time.perf_counter()
        res = prune(model, method, "heads", "units=0.75", calib)
        row(f"heads -25% {method} ({'/'.join(map(str, res.model.cfg.layer_heads))})", res.model,
            time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = prune(model, "block-influence", "blocks", "units=0.75", calib)
    bi = [round(float(s), 4) for s in importance.scores(model, "block-influence", "blocks", calib)]
    row(f"blocks -1 block-influence (removed {res.plan.blocks}, BI {bi})", res.model, time.perf_counter() - t0)
    t0 = time.perf_counter()
    fused = fuse(model, res.plan.blocks, calib, steps=args.fuse_steps)
    row(f"blocks -1 + FuseGPT fusion ({args.fuse_steps} steps)", fused, time.perf_counter() - t0)

    base = rows[0]
    print(f"\nProtocol: calibration {args.n_samples} x {args.seq_len} bytes of the training plays; perplexity on "
          f"{args.max_windows} evenly spaced {args.seq_len}-byte windows of othello + richard_iii; "
          f"recovery: {args.recover}; torch threads {torch.get_num_threads()}.\n")
    print("| setting | params | ppl | ppl ratio | generate tok/s | speed ratio | prune s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['params']:,} ({r['params'] / base['params']:.2f}) | {r['ppl']:.3f} | "
              f"{r['ppl'] / base['ppl']:.3f} | {r['tps']:.0f} | {r['tps'] / base['tps']:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
