"""Conditional compute on the Shakespeare byte-level LM, every variant with the same token budget
through the real Trainer, in one run:

- dense vs MoE 8 experts top-2 at equal *active* FFN parameters (Mixtral routing: softmax, top-2,
  renormalised; also with the experts' learning rate x4), expert choice, top-1 + a shared expert;
- Mixture-of-Depths at 12.5% and 50% capacity on every other block (as in the paper);
- MatFormer (granularities 1/4, 1/2, 1, trained jointly) whose extracted submodels are compared with
  the same architectures trained alone;
- early exit (exits after layers 0..L-2, CALM decoding): the speed/quality curve over thresholds;
- an Adaptive Computation Module FFN (4 learners, budget 50% of the neurons; active = measured mean);
- Mixture of Hidden Dimensions (8 sub-dimensions of d_model, 2 shared + top-2 routed: half of the
  projections' weights active per token) and Monet (8 + 8 pieces = 64 experts, vertical and
  horizontal decomposition; its fast form runs every piece's bottom layer, so active = total).

Reports validation loss (nats/byte), training tokens/s, greedy decode tokens/s, total and active FFN
parameters and router load balance on the validation set (max / mean tokens per expert, averaged
over layers; 1.0 is perfect). Split: validation = othello, richard_iii; train = the rest.

Caveats printed with the tables: expert-choice routing picks tokens among the whole sequence, so its
LM numbers see the future (allow_future_routing); MoD's validation loss is measured on the causal
predictor path (what decoding does), with the non-causal top-k loss beside it. The early-exit
``tf_loss`` picks each position's exit from the full forward's exit logits (teacher forcing); the
decode columns are real CALM decoding (skipped layers' caches filled from the exit state).

    python benchmarks/conditional_compute.py [--data ../shared/data/shakespeare] [--steps 120] [--only dense,moe_top2]
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from efformer.models import create_model, extract
from efformer.models.depth import MoDBlock
from efformer.models.early_exit import generate_with_exit, lm_exit_logits
from efformer.nn.acm import ACM
from efformer.nn.moe import MoE, load_balance
from efformer.nn.mohd import MoHD
from efformer.train.data import TensorExamples, collate, loss_terms
from efformer.train.trainer import Trainer

VALID = ("othello_gut.txt", "richard_iii_gut.txt")
GRANULARITIES = [0.25, 0.5, 1.0]
THRESHOLDS = [1.0, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2]


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
    moe = {"n_experts": 8, "top_k": 2}
    mat = {"granularities": GRANULARITIES}
    return {
        "dense": {},
        "moe_top2": {"ffn": "moe", "ffn_options": {**moe, "normalize_topk": True}},
        "moe_top2_lr4": {"ffn": "moe", "ffn_options": {**moe, "normalize_topk": True, "expert_lr_scale": 4.0}},
        "moe_expert_choice": {"ffn": "moe", "ffn_options": {**moe, "routing": "expert", "capacity_factor": 2.0,
                                                            "allow_future_routing": True}},
        "moe_top1_shared": {"ffn": "moe", "ffn_options": {**moe, "top_k": 1, "n_shared": 1}},
        "mod_12.5%": {"mod_capacity": [c and 0.125 for c in every_other]},
        "mod_50%": {"mod_capacity": [c and 0.5 for c in every_other]},
        "matformer": {"ffn": "matformer", "ffn_options": mat},
        **{f"alone_{g}": {"ffn": "matformer", "ffn_options": {**mat, "layer_widths": [g] * n_layers}}
           for g in GRANULARITIES[:-1]},
        "early_exit": {"exit_layers": list(range(n_layers - 1))},
        "acm_50%": {"ffn": "acm", "ffn_options": {"n_learners": 4, "budget": 0.5}},
        "mohd_50%": {"ffn": "mohd", "ffn_options": {"n_groups": 8, "n_shared": 2, "top_k": 2}},
        "monet_vd": {"ffn": "monet", "ffn_options": {"n_pieces": 8, "decompose": "vertical"}},
        "monet_hd": {"ffn": "monet", "ffn_options": {"n_pieces": 8, "decompose": "horizontal"}},
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
        elif isinstance(f, MoHD):  # the projections' share of the active sub-dimensions
            proj = f.gate_up.weight.numel() + f.down.weight.numel()
            active += n - proj + round(proj * (f.opts.n_shared + f.opts.top_k) / f.opts.n_groups)
        elif isinstance(f, ACM) and "fraction" in f.stats:  # the last forward's mean fraction of neurons
            learners = 3 * f.w_gate.numel()
            active += n - learners + round(float(f.stats["fraction"]) * learners)
        else:
            active += n
    return total, active


def batches(data, bs: int):
    for i in range(0, len(data), bs):
        yield collate([data[j] for j in range(i, min(i + bs, len(data)))], 0)


@torch.no_grad()
def validate(model, data, bs: int, routing: str | None = None) -> tuple[float, float | None]:
    """(mean loss per predicted byte, mean router max/mean load over MoE (and MoHD routed) layers) on ``data``."""
    model.eval()
    for blk in model.backbone.blocks:
        if isinstance(blk, MoDBlock) and routing:
            blk.routing = routing
    total = count = 0.0
    balance = []
    for batch in batches(data, bs):
        t, c, _ = loss_terms(model, batch)
        total, count = total + float(t), count + float(c)
        balance += [load_balance(b.ffn.stats) for b in model.backbone.blocks if isinstance(b.ffn, MoE)]
        balance += [load_balance({"tokens_per_expert": b.ffn.stats["tokens_per_group"][b.ffn.opts.n_shared:]})
                    for b in model.backbone.blocks if isinstance(b.ffn, MoHD) and b.ffn.opts.top_k]
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


@torch.no_grad()
def exit_curve(model, data, bs: int, prompt: torch.Tensor, new: int) -> list[dict]:
    """Per threshold: teacher-forced loss and mean layers with per-position exits, and real CALM decoding
    (tokens/s, mean layers run, agreement with full-depth greedy tokens)."""
    model.eval()
    n_layers = model.cfg.n_layers
    exits = model.cfg.exit_layers
    per_batch = []
    for batch in batches(data, bs):
        final = model(batch["input_ids"])[:, :-1].float()
        cand = [lm_exit_logits(model, model.backbone.exit_hidden[i])[:, :-1].float() for i in exits] + [final]
        target = batch["input_ids"][:, 1:]
        ce = torch.stack([F.cross_entropy(lg.transpose(1, 2), target, reduction="none") for lg in cand])  # (x, b, n)
        conf = torch.stack([lg.softmax(-1).amax(-1) for lg in cand])
        per_batch.append((ce, conf))
    full_ids, _ = generate_with_exit(model, prompt, new, threshold=1.0)
    rows = []
    for thr in THRESHOLDS:
        loss = count = layers = 0.0
        for ce, conf in per_batch:
            ok = conf > thr
            ok[-1] = True  # the final head always answers
            first = ok.float().argmax(0)  # first confident exit per position
            loss += float(ce.gather(0, first[None])[0].sum())
            depth = torch.tensor([*exits, n_layers - 1], dtype=torch.float)[first] + 1
            layers, count = layers + float(depth.sum()), count + first.numel()
        generate_with_exit(model, prompt, 4, threshold=thr)  # warm-up
        t0 = time.perf_counter()
        ids, where = generate_with_exit(model, prompt, new, threshold=thr)
        tps = new / (time.perf_counter() - t0)
        agree = float((ids[:, -new:] == full_ids[:, -new:]).float().mean())
        rows.append({"threshold": thr, "tf_loss": loss / count, "tf_layers": layers / count, "decode_tok_s": tps,
                     "decode_layers": float((where + 1).float().mean()), "agree_full": agree})
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` (floats < 100 with 4 decimals, larger ones rounded)."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    """Train every variant on the same bytes and print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/shakespeare")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--val-windows", type=int, default=48)
    p.add_argument("--decode-tokens", type=int, default=48)
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
          f"d_model={a.d_model}, {a.layers} layers, lr {a.lr}; validation {len(val)} x {a.seq_len} bytes; "
          f"{a.threads} thread(s)\n", flush=True)
    rows, mat_rows, exit_rows, trained = [], [], [], {}
    chosen = [v for v in a.only.split(",") if v]
    start = time.perf_counter()
    for name, overrides in variants(a.layers).items():
        if chosen and name not in chosen:
            continue
        torch.manual_seed(0)
        model = create_model("lm-tiny", vocab_size=256, d_model=a.d_model, n_layers=a.layers, n_heads=4,
                             max_len=a.seq_len, **overrides)
        total_p, active_p = ffn_params(model)
        with tempfile.TemporaryDirectory() as tmp:
            train_cfg = {"steps": a.steps, "batch_size": a.batch, "lr": a.lr, "warmup_steps": min(20, a.steps // 5),
                         "eval_every": 0, "checkpoint_every": 0, "log_every": 50, "device": "cpu"}
            trainer = Trainer(model, train_cfg,
                              TensorExamples(train), None, out_dir=Path(tmp) / name, progress_stream=io.StringIO())
            t0 = time.perf_counter()
            for _ in range(a.steps):
                trainer.train_step()
            tps = tokens / (time.perf_counter() - t0)
        loss, bal = validate(model, val, a.batch)
        if name.startswith("acm"):  # active parameters as measured on the last validation batch
            active_p = ffn_params(model)[1]
        trained[name] = (model, loss, total_p)
        row = {"variant": name, "val_loss": loss, "train_tok_s": tps, "ffn_params": total_p,
               "ffn_active": active_p, "load_max/mean": bal}
        if name.startswith("mod"):
            row["val_loss_topk"] = validate(model, val, a.batch, routing="topk")[0]
        if name != "moe_expert_choice":  # expert choice cannot decode causally
            row["decode_tok_s"] = decode_speed(model, prompt, a.decode_tokens)
        rows.append(row)
        if name == "early_exit":
            exit_rows = exit_curve(model, val, a.batch, prompt, a.decode_tokens)
        print(f"  {name}: val {loss:.4f} ({loss / math.log(2):.3f} bits/byte), {tps:.0f} tok/s "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
    if "matformer" in trained:
        full = trained["matformer"][0]
        for g in GRANULARITIES:
            sub = extract(full, g)
            alone = trained.get(f"alone_{g}") or (trained.get("dense") if g == 1.0 else None)
            mat_rows.append({"granularity": g, "ffn_params": ffn_params(sub)[0],
                             "matformer_submodel": validate(sub, val, a.batch)[0],
                             "trained_alone": alone[1] if alone else None})
    print("\n" + table(rows, ["variant", "val_loss", "val_loss_topk", "train_tok_s", "decode_tok_s", "ffn_params",
                               "ffn_active", "load_max/mean"]))
    if mat_rows:
        print("\nMatFormer: extracted submodels vs the same architecture trained alone (1.0 alone = dense)\n")
        print(table(mat_rows, ["granularity", "ffn_params", "matformer_submodel", "trained_alone"]))
    if exit_rows:
        print(f"\nEarly exit (exits after layers {list(range(a.layers - 1))}; {a.layers} = full depth)\n")
        print(table(exit_rows, ["threshold", "tf_loss", "tf_layers", "decode_tok_s", "decode_layers", "agree_full"]))
    print("\nexpert choice sees later tokens when routing (allow_future_routing): its LM loss is optimistic. "
          "MoD val_loss: causal predictor path; val_loss_topk: the non-causal top-k routing of training. "
          f"Total {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
