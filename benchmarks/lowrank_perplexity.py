"""Held-out perplexity of a byte-level LM after low-rank factorization and sparsity, each before and after a short
LoRA recovery; plus SCAP-style activation sparsity (achieved sparsity and perplexity).

Usage: ``python benchmarks/lowrank_perplexity.py --model /tmp/lm-shakespeare-ref`` (an efformer folder, e.g.
from ``benchmarks/train_shakespeare_lm.py``). Split as in training: validation = othello + richard_iii,
train = the other plays. Calibration: ``--n-samples`` random train windows; evaluation: the first
``--max-windows`` non-overlapping ``--window``-byte windows of the validation text. Rows:

- SVD vs activation-aware SVD keeping 80/60/40% of the attention + FFN linear weights (equal parameters);
- 50% unstructured magnitude vs Wanda, and 2:4 (Wanda scores);
- each of those after LoRA recovery: rank ``--lora-rank`` adapters on every linear but the head,
  ``--steps`` AdamW steps of ``--batch`` x ``--seq`` train bytes through ``efformer.train.Trainer`` (only the
  adapters train; sparse bases keep their zeros because the adapters stay unmerged);
- SCAP activation thresholds on the FFN inputs at 30/50/70% target sparsity (no recovery).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_shakespeare_lm import DATA, split  # the same split as training (sibling script)

import efformer
from efformer.compress import (
    FactorizeConfig,
    SparsityConfig,
    add_lora,
    calibrate_activation_sparsity,
    calibration_windows,
    factorize,
    sparsify,
)
from efformer.compress.evaluate import perplexity
from efformer.train.trainer import Trainer


def linear_params(model) -> int:
    """Weights of the attention + FFN linears (everything but embeddings, norms and the head)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.blocks") and p.dim() == 2)


def recover(model, train_ids, args) -> float:
    """LoRA-train ``model`` (a copy is modified) and return the seconds it took."""
    add_lora(model, args.lora_rank, alpha=2 * args.lora_rank)
    rows = calibration_windows(train_ids, args.seq, args.steps * args.batch, seed=1)
    data = [{"input_ids": r} for r in rows]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": 10,
                                  "eval_every": 0, "checkpoint_every": 0, "device": "cpu", "log_every": 10 ** 6},
                          data, out_dir=Path(tmp) / "run")
        for _ in range(args.steps):
            trainer.train_step()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/lm-shakespeare-ref")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=48)
    p.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--steps", type=int, default=100, help="LoRA recovery steps (0: no recovery)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--only", nargs="+", default=None, help="run only these variants (e.g. 'asvd 60%%' 'wanda 2:4')")
    p.add_argument("--no-scap", action="store_true", help="skip the activation-sparsity table")
    p.add_argument("--quick", action="store_true", help="one keep fraction, 10 steps, 8 windows (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.keep, args.steps, args.max_windows, args.n_samples = [0.6], 10, 8, 4
    torch.manual_seed(0)
    train_ids, val_ids = split(Path(args.data))
    base = efformer.load(args.model)
    calib = calibration_windows(train_ids, args.window, args.n_samples, seed=0)
    ppl = lambda m: perplexity(m, val_ids, args.window, max_windows=args.max_windows)  # noqa: E731
    full = linear_params(base)
    base_ppl = ppl(base)
    print(f"model {args.model}: {sum(p.numel() for p in base.parameters()):,} parameters, {full:,} in the "
          f"block linears; validation perplexity {base_ppl:.3f} ({args.max_windows} x {args.window} bytes)",
          flush=True)
    variants = []
    for keep in args.keep:
        for method in ("svd", "asvd"):
            variants.append((f"{method} {keep:.0%}", lambda m, method=method, keep=keep: factorize(
                m, FactorizeConfig(method=method, params=keep), calib if method == "asvd" else None)))
    for name, cfg in (("magnitude 50%", SparsityConfig(method="magnitude", sparsity=0.5)),
                      ("wanda 50%", SparsityConfig(method="wanda", sparsity=0.5)),
                      ("wanda 2:4", SparsityConfig(method="wanda", pattern="nm"))):
        variants.append((name, lambda m, cfg=cfg: sparsify(m, cfg, calib)))
    variants = [v for v in variants if args.only is None or v[0] in args.only]
    rows = []
    for name, apply in variants:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        apply(model)
        made = time.perf_counter() - t0
        nonzero = sum(int(p.count_nonzero()) for n, p in model.named_parameters()
                      if n.startswith("backbone.blocks") and p.dim() == 2)
        before = ppl(model)
        after, secs = float("nan"), 0.0
        if args.steps:
            secs = recover(model, train_ids, args)
            after = ppl(model)
        rows.append((name, nonzero / full, before, after, made, secs))
        print(f"  {name:<14} kept {nonzero / full:6.1%}  ppl {before:8.3f} -> {after:8.3f} after LoRA "
              f"({made:.1f}s to make, {secs:.1f}s to recover)", file=sys.stderr, flush=True)
    print(f"\n| variant | block-linear weights kept (non-zero) | ppl | ppl after LoRA ({args.steps} steps) | "
          "ppl / dense |")
    print("|---|---|---|---|---|")
    print(f"| dense | 100.0% | {base_ppl:.3f} | - | 1.000 |")
    for name, kept, before, after, _, _ in rows:
        print(f"| {name} | {kept:.1%} | {before:.3f} | {f'{after:.3f}' if args.steps else '-'} | "
              f"{before / base_ppl:.3f} |")
    print("\n| SCAP target (FFN inputs) | achieved on validation | ppl | ppl / dense |")
    print("|---|---|---|---|")
    for target in () if args.no_scap else (0.3, 0.5, 0.7):
        act = calibrate_activation_sparsity(base, calib, target)
        value = ppl(base)
        reached = act.achieved()
        act.remove()
        mean = sum(reached.values()) / len(reached)
        print(f"| {target:.0%} | {mean:.1%} (min {min(reached.values()):.1%}, max {max(reached.values()):.1%}) | "
              f"{value:.3f} | {value / base_ppl:.3f} |")
    print(f"\nLoRA budget: rank {args.lora_rank} (alpha {2 * args.lora_rank}) on every block linear, {args.steps} "
          f"steps x {args.batch} x {args.seq} train bytes, lr {args.lr}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
