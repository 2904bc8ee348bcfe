"""Converting a trained LM's attention, with and without training: held-out perplexity and decode time.

Rows, on a trained efformer LM folder (``--model``; byte-level unless it holds a tokenizer.json):
the original; LightTransfer streaming conversion of the lazy half of the layers (no training); every layer
converted to a linear-time mixer (``--mixer``) and distilled from the original for ``--steps`` steps
(``efformer.interop.distill``: KL on the next-token distributions, only the converted mixers trained);
and the same all-``--mixer`` model trained from scratch on the same text for the same steps and batch.
Validation is ``--val`` files of ``--data`` (default Othello and Richard III of the Shakespeare texts);
training is every other ``.txt`` there. Decode: milliseconds of one step after a ``--context`` prefill.

Run: ``python benchmarks/bench_distill.py`` (``--steps 5 --context 512 --eval-windows 4`` for a check).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

import efformer
from efformer.data.text import load_tokenizer
from efformer.interop import stream_convert
from efformer.interop.distill import distill, heldout_ppl, text_examples
from efformer.models.config import build_config
from efformer.train.data import encode_text
from efformer.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream_convert import DEFAULT_DATA, decode_ms  # noqa: E402


def longer(model, max_len: int):
    """``model`` rebuilt with room for ``max_len`` positions (same weights)."""
    new = efformer.create_model(build_config(model.cfg.model_dump(), max_len=max(max_len, model.cfg.max_len)))
    new.load_state_dict(model.state_dict())
    return new


def main(argv=None) -> int:
    """Convert, distil, train from scratch, measure; print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/lm-shakespeare-ref"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--val", nargs="+", default=["othello_gut.txt", "richard_iii_gut.txt"])
    ap.add_argument("--mixer", default="simple_gla", help="linear-time mixer every layer becomes")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="training window")
    ap.add_argument("--eval-seq", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    ap.add_argument("--scratch-lr", type=float, default=3e-3, help="from-scratch learning rate")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = longer(efformer.load(args.model), args.context + 16)
    tok = load_tokenizer(args.model)
    val_files = [args.data / v for v in args.val]
    train_files = sorted(p for p in args.data.glob("*.txt") if p.name not in args.val)
    ids = encode_text(b"\n".join(f.read_bytes() for f in val_files), tok, teacher.cfg.vocab_size, "validation")
    step = (len(ids) - args.eval_seq) // args.eval_windows  # windows spread evenly over the validation text
    val = [{"input_ids": ids[i * step : i * step + args.eval_seq]} for i in range(args.eval_windows)]
    rows = [("original (softmax)", teacher, "-")]

    half, report, masses = stream_convert(teacher, torch.stack([v["input_ids"] for v in val[:4]]), 0.5,
                                          args.sink, args.window)
    print("attention mass on sink + window per layer: " + ", ".join(f"{m:.3f}" for m in masses))
    rows.append((f"lazy half {report.layers} -> sink {args.sink} + window {args.window}", half, "none"))

    train = {"batch_size": args.batch, "lr": args.lr, "warmup_steps": min(10, args.steps), "eval_batches": 2}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = distill(teacher, train_files, args.mixer, steps=args.steps, out_dir=Path(tmp) / "distill",
                      seq_len=args.seq, eval_fraction=0.01, train=train, progress_stream=sys.stdout)
        t_distill = time.perf_counter() - t0
        print(f"distilled {args.steps} steps in {t_distill:.0f} s; held-out KL {out.metrics['kl_before']:.3f} -> "
              f"{out.metrics['kl_after']:.3f}", flush=True)
        rows.append((f"all layers -> {args.mixer}, distilled", out.student, f"{args.steps} steps x {args.batch} x "
                     f"{args.seq} tokens, {t_distill:.0f} s"))

        torch.manual_seed(0)
        scratch = efformer.create_model(build_config(teacher.cfg.model_dump(), mixer=args.mixer, mixer_options={}))
        windows, _ = text_examples(train_files, tok, teacher.cfg.vocab_size, args.seq, args.seq, 0.01)
        t0 = time.perf_counter()
        cfg = {**train, "lr": args.scratch_lr, "steps": args.steps, "eval_every": 0, "checkpoint_every": 0}
        Trainer(scratch, cfg, windows, None, out_dir=Path(tmp) / "scratch", progress_stream=io.StringIO()).fit()
        t_scratch = time.perf_counter() - t0
        rows.append((f"all layers {args.mixer}, from scratch", scratch, f"same steps and batch, lr {args.scratch_lr}, "
                     f"{t_scratch:.0f} s"))

        print(f"\n| model | held-out ppl (seq {args.eval_seq}) | decode ms/token at {args.context} | training |")
        print("|---|---|---|---|")
        for name, m, budget in rows:
            print(f"| {name} | {heldout_ppl(m, val):.3f} | {decode_ms(m, args.context):.2f} | {budget} |", flush=True)
    print(f"\nfp32, {args.threads} threads, torch {torch.__version__}; validation {', '.join(args.val)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
