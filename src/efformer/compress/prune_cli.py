"""``efformer prune``: structured pruning of a saved model under a budget, with a before/after table."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from efformer.compress.budget import TARGET_KINDS, measure_latency, parse_target, prune
from efformer.compress.calibration import calibration_windows, read_text_ids
from efformer.compress.evaluate import perplexity
from efformer.compress.fuse import fuse
from efformer.compress.importance import METHODS, NEEDS_CALIBRATION, check_method
from efformer.compress.prune import KINDS, count_params, flops_per_token
from efformer.errors import CheckpointError, ConfigError, DataError
from efformer.models import load, save


def register_prune(sub) -> None:
    """Add the ``prune`` subcommand."""
    p = sub.add_parser("prune", help="structured pruning (heads, FFN neurons, blocks) of a saved model to a budget",
                       description="Scores the units, removes the least important until the target is met within "
                       "1%, saves an ordinary (smaller) efformer model and prints params, FLOPs/token, measured "
                       "latency and perplexity before and after.")
    p.add_argument("model", help="folder written by efformer.save (or efformer convert)")
    p.add_argument("--method", required=True, help=f"importance score: {', '.join(METHODS)}")
    p.add_argument("--what", required=True, help=f"units to remove: {', '.join(KINDS)}")
    p.add_argument("--target", required=True, help=f"KIND=FRACTION kept, KIND one of {', '.join(TARGET_KINDS)} "
                   "(params=0.6 keeps 60%% of the parameters)")
    p.add_argument("--calib", nargs="+", default=None, help="UTF-8 calibration text files (every method but "
                   "magnitude, and --fuse)")
    p.add_argument("--eval", nargs="+", default=None, help="text files for the perplexity column (default: --calib)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration / perplexity window")
    p.add_argument("--max-windows", type=int, default=32, help="perplexity windows evaluated")
    p.add_argument("--fuse", action="store_true", help="blocks only: fold removed blocks into their neighbours "
                   "(FuseGPT) and fine-tune briefly on the calibration text")
    p.add_argument("--fuse-steps", type=int, default=100, help="fusion fine-tuning steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the pruned model (new, or a saved model)")
    p.set_defaults(fn=_cmd_prune)


def _check_args(args) -> None:
    """Every argument checked before the model is read or anything written."""
    if args.method not in METHODS:
        raise ConfigError("--method", args.method, f"one of {', '.join(METHODS)}")
    if args.what not in KINDS:
        raise ConfigError("--what", args.what, f"one of {', '.join(KINDS)}")
    parse_target(args.target)
    for flag, v in (("--n-samples", args.n_samples), ("--seq-len", args.seq_len), ("--max-windows", args.max_windows),
                    ("--fuse-steps", args.fuse_steps)):
        if v < 1:
            raise ConfigError(flag, v, "must be >= 1")
    if args.fuse and args.what != "blocks":
        raise ConfigError("--fuse", True, "fusion folds removed blocks into their neighbours: use it with --what "
                          "blocks")
    if (args.method in NEEDS_CALIBRATION or args.fuse) and not args.calib:
        why = "--fuse" if args.fuse else f"--method {args.method}"
        raise ConfigError("--calib", None, f"{why} needs calibration text files (--calib FILES)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder path")
    if out.resolve() == Path(args.model).resolve():
        raise ConfigError("--out", args.out, "must differ from the input model folder (keep the original)")
    for f in (args.calib or []) + (args.eval or []):
        if not Path(f).is_file():
            raise DataError(f"text file {f} does not exist or is not a file; pass existing text files")


def _row(model: nn.Module, ids, args) -> dict[str, float | None]:
    ppl = None
    if model.cfg.task == "lm" and ids is not None and ids.numel() >= args.seq_len:
        ppl = perplexity(model, ids, args.seq_len, max_windows=args.max_windows)
    return {"params": count_params(model), "flops": flops_per_token(model, args.seq_len),
            "latency": measure_latency(model, args.seq_len), "ppl": ppl}


def _cmd_prune(args) -> int:
    _check_args(args)
    model = load(args.model)
    check_method(model, args.method, args.what, torch.zeros(1, 1, dtype=torch.long))  # before any output
    if args.seq_len > model.cfg.max_len:
        raise ConfigError("--seq-len", args.seq_len, f"must be <= the model's max_len {model.cfg.max_len}")
    calib = None
    if args.calib:
        ids = read_text_ids(args.calib)
        if ids.numel() == 0:
            raise DataError(f"the calibration files {args.calib} are empty; give text files with content")
        calib = calibration_windows(ids, args.seq_len, args.n_samples, args.seed)
    eval_ids = read_text_ids(args.eval) if args.eval else (read_text_ids(args.calib) if args.calib else None)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    progress(f"measuring the input model ({model.cfg.n_layers} layers)")
    before = _row(model, eval_ids, args)
    result = prune(model, args.method, args.what, args.target, calib, progress=progress)
    pruned = result.model
    if args.fuse:
        progress(f"fusing removed blocks {result.plan.blocks} into their neighbours")
        pruned = fuse(model, result.plan.blocks, calib, steps=args.fuse_steps, seed=args.seed, progress=progress)
    after = _row(pruned, eval_ids, args)
    save(pruned, args.out)
    print(format_table(before, after, f"{args.method} {args.what} {args.target}"
                       + (" + fuse" if args.fuse else "")))
    print(f"kept {result.target.kind}={result.achieved:.4f} (target {result.target.value}); saved to {args.out}")
    return 0


def format_table(before: dict, after: dict, title: str) -> str:
    """The before/after table: params, FLOPs/token, latency (ms per forward), perplexity."""
    def fmt(key, v):
        if v is None:
            return "-"
        return {"params": f"{v:,}", "flops": f"{v / 1e6:.2f}M", "latency": f"{v * 1e3:.2f} ms",
                "ppl": f"{v:.3f}"}[key]
    lines = [title, f"{'':<16}{'before':>16}{'after':>16}{'ratio':>8}"]
    names = {"params": "params", "flops": "FLOPs/token", "latency": "latency", "ppl": "perplexity"}
    for key, name in names.items():
        b, a = before[key], after[key]
        ratio = f"{a / b:.3f}" if a is not None and b else "-"
        lines.append(f"{name:<16}{fmt(key, b):>16}{fmt(key, a):>16}{ratio:>8}")
    return "\n".join(lines)
