"""Train a small byte-level LM on the Shakespeare corpus (split by play) for the quantization tables.

Usage: ``python benchmarks/train_shakespeare_lm.py --out /tmp/shakespeare-lm --minutes 5``.
Validation = othello + richard_iii (the data README's split); train = the other files. Prints the
validation perplexity (non-overlapping windows of ``--seq`` bytes) every ``--eval-every`` steps and
saves the model with ``efformer.save`` at the end.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import efformer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "shakespeare"
VALIDATION = ("othello_gut.txt", "richard_iii_gut.txt")


def split(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) as uint8 tensors, split by file."""
    train, val = [], []
    for f in sorted(data.glob("*.txt")):
        (val if f.name in VALIDATION else train).append(f.read_bytes())
    as_t = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()
    return as_t(train), as_t(val)


@torch.no_grad()
def val_ppl(model, val: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    """Perplexity over the first ``max_windows`` non-overlapping windows of ``seq + 1`` bytes."""
    model.eval()
    n = min(max_windows, (len(val) - 1) // seq)
    x = val[: n * seq + 1]
    ids, tgt = x[:-1].view(n, seq), x[1:].view(n, seq)
    loss = sum(F.cross_entropy(model(ids[i:i + 16]).flatten(0, 1), tgt[i:i + 16].flatten(), reduction="sum").item()
               for i in range(0, n, 16))
    model.train()
    return math.exp(loss / tgt.numel())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="/tmp/shakespeare-lm")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after the mixer and in the FFN")
    p.add_argument("--mixer-options", default="{}", help="JSON options of the softmax mixer (e.g. clipped softmax)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default=None, help="continue training the model saved in this folder")
    args = p.parse_args()
    import json
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, val = split(Path(args.data))
    # ffn_mult 3 makes the SwiGLU hidden width 2/3*3*d = 2d, so groups of 128 divide every linear's input.
    model = efformer.create_model("lm-small", d_model=args.d_model, n_layers=args.layers, n_heads=4, ffn_mult=3.0,
                                  max_len=1024, dropout=args.dropout, mixer_options=json.loads(args.mixer_options))
    if args.init:
        model = efformer.load(args.init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    t0, step = time.time(), 0
    budget = args.minutes * 60
    while step < args.steps and time.time() - t0 < budget:
        # The schedule follows whichever budget (steps or minutes) runs out first, so lr reaches 0 either way.
        frac = min(1.0, max((time.time() - t0) / budget, step / args.steps))
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        x = torch.stack([train[s:s + args.seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            print(f"step {step} {time.time() - t0:.0f}s train loss {loss.item():.3f} "
                  f"val ppl {val_ppl(model, val, args.seq):.3f}", flush=True)
    print(f"done: {step} steps in {time.time() - t0:.0f}s; val ppl {val_ppl(model, val, args.seq):.3f}")
    efformer.save(model.eval(), args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
