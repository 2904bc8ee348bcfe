"""Conditional compute on the Shakespeare byte-level LM: dense vs MoE (8 experts, top-2, equal active
parameters), expert choice, a shared expert, and Mixture-of-Depths at 12.5% / 50% capacity (every
other block routed, as in the paper), all with the same token budget through the real Trainer.

Reports validation loss (nats/byte), training tokens/s, total and active FFN parameters, router load
balance on the validation batch (max / mean tokens per expert, averaged over layers; 1.0 is perfect)
and, for MoD, greedy decode tokens/s. Split: validation = othello, richard_iii; train = the rest.

Caveats printed with the table: expert-choice routing picks tokens among the whole sequence, so its
LM numbers see the future (allow_future_routing); MoD's validation loss is measured on the causal
predictor path (what decoding does), with the non-causal top-k loss beside it.

    python benchmarks/conditional_compute.py [--data ../shared/data/shakespeare] [--steps 150] [--only dense,moe]
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import torch

from efformer.models import create_model
from efformer.models.depth import MoDBlock
from efformer.nn.moe import MoE, load_balance
from efformer.train.data import TensorExamples, collate, loss_terms
from efformer.train.trainer import Trainer

VALID = ("othello_gut.txt", "richard_iii_gut.txt")


def windows(files: list[Path], seq_len: int, limit: int | None, seed: int) -> torch.Tensor:
    """Non-overlapping byte windows (n, seq_len) of the files, shuffled, at most ``limit``."""
    data = torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long)
    n = data.numel() // seq_len
    w = data[: n * seq_len].reshape(n, seq_len)
    w = w[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return w[:limit] if limit else w


def variants(n_layers: int) -> dict[str, dict]:
    """Model overrides of each compared variant (dense FFN width: swiglu at ffn_mult 4)."""
    every_other = [None if i % 2 == 0 else 1.0 for i in range(n_layers)]
    return {
        "dense": {},
        "moe_top2": {"ffn": "moe", "ffn_options": {"n_experts": 8, "top_k": 2}},
        "moe_expert_choice": {"ffn": "moe", "ffn_options": {"n_experts": 8, "top_k": 2, "routing": "expert",
                                                            "capacity_factor": 2.0, "allow_future_routing": True}},
        "moe_shared": {"ffn": "moe", "ffn_options": {"n_experts": 8, "top_k": 1, "n_shared": 1}},
        "mod_12.5%": {"mod_capacity": [c and 0.125 for c in every_other]},
        "mod_50%": {"mod_capacity": [c and 0.5 for c in every_other]},
    }


def ffn_params(model) -> tuple[int, int]:
    """(total, active per token) FFN parameters, routers included in both."""
    total = active = 0
    for blk in model.backbone.blocks:
        f = blk.ffn
        n = sum(p.numel() for p in f.parameters())
        total += n
        if isinstance(f, MoE):
            per_expert = f.w_in[0].numel() + f.w_out[0].numel()
            routed = f.opts.top_k if f.opts.routing == "token" else f.opts.capacity_factor  # experts per token
            active += n - f.opts.n_experts * per_expert + round(routed * per_expert)
        else:
            active += n
    return total, active


@torch.no_grad()
def validate(model, data, bs: int, routing: str | None = None) -> tuple[float, float | None]:
    """(mean loss per predicted byte, mean router max/mean load over MoE layers) on ``data``."""
    model.eval()
    for blk in model.backbone.blocks:
        if isinstance(blk, MoDBlock) and routing:
            blk.routing = routing
    total = count = 0.0
    balance = []
    for i in range(0, len(data), bs):
        batch = collate([data[j] for j in range(i, min(i + bs, len(data)))], 0)
        t, c, _ = loss_terms(model, batch)
        total, count = total + float(t), count + float(c)
        balance += [load_balance(b.ffn.stats) for b in model.backbone.blocks if isinstance(b.ffn, MoE)]
    for blk in model.backbone.blocks:
        if isinstance(blk, MoDBlock):
            blk.routing = "auto"
    return total / count, (sum(balance) / len(balance) if balance else None)


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new: int) -> float:
    """Greedy cached decoding tokens/s (one row)."""
    model.generate(prompt, max_new_tokens=4)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new)
    return new / (time.perf_counter() - t0)


def main() -> None:
    """Train every variant on the same bytes and print one markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/shakespeare")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(a.data)
    files = sorted(root.glob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files under {root}; pass --data DIR (the Shakespeare folder)")
    train = windows([f for f in files if f.name not in VALID], a.seq_len, a.steps * a.batch, seed=0)
    val = TensorExamples(windows([f for f in files if f.name in VALID], a.seq_len, a.val_windows, seed=1))
    prompt = val[0]["input_ids"][None, :16]
    tokens = a.steps * a.batch * a.seq_len
    print(f"budget: {a.steps} steps x {a.batch} x {a.seq_len} bytes = {tokens} training tokens per variant; "
          f"d_model={a.d_model}, {a.layers} layers; validation {len(val)} x {a.seq_len} bytes; "
          f"{a.threads} thread(s)\n")
    rows = []
    chosen = [v for v in a.only.split(",") if v]
    for name, overrides in variants(a.layers).items():
        if chosen and name not in chosen:
            continue
        torch.manual_seed(0)
        model = create_model("lm-tiny", vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=4,
                             max_len=a.seq_len, **overrides)
        total_p, active_p = ffn_params(model)
        with tempfile.TemporaryDirectory() as tmp:
            train_cfg = {"steps": a.steps, "batch_size": a.batch, "lr": 3e-3, "warmup_steps": min(10, a.steps // 5),
                         "eval_every": 0, "checkpoint_every": 0, "log_every": 50, "device": "cpu"}
            trainer = Trainer(model, train_cfg,
                              TensorExamples(train), None, out_dir=Path(tmp) / name, progress_stream=io.StringIO())
            t0 = time.perf_counter()
            for _ in range(a.steps):
                trainer.train_step()
            tps = tokens / (time.perf_counter() - t0)
        loss, bal = validate(model, val, a.batch)
        row = {"variant": name, "val_loss": loss, "train_tok_s": tps, "ffn_params": total_p,
               "ffn_active": active_p, "load_max/mean": bal}
        if name.startswith("mod"):
            row["val_loss_topk"] = validate(model, val, a.batch, routing="topk")[0]
        if name == "dense" or name.startswith("mod"):
            row["decode_tok_s"] = decode_speed(model, prompt, a.decode_tokens)
        rows.append(row)
        print(f"  {name}: val {loss:.4f} ({loss / math.log(2):.3f} bits/byte), {tps:.0f} tok/s", flush=True)
    cols = ["variant", "val_loss", "val_loss_topk", "train_tok_s", "decode_tok_s", "ffn_params", "ffn_active",
            "load_max/mean"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c) for c in cols]
        print("| " + " | ".join("" if v is None else f"{v:.4f}" if isinstance(v, float) and v < 100 else
                                f"{v:.0f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    print("\nexpert choice sees later tokens when routing (allow_future_routing): its LM loss is optimistic. "
          "MoD val_loss: causal predictor path; val_loss_topk: the non-causal top-k routing of training.")


if __name__ == "__main__":
    main()
