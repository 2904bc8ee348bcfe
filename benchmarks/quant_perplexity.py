"""Validation perplexity of a byte-level LM under every quantization method (the GPTQ/SmoothQuant table shape).

Usage: ``python benchmarks/quant_perplexity.py --model /tmp/shakespeare-lm`` (train one first with
``benchmarks/train_shakespeare_lm.py``). Calibration: ``--n-samples`` random windows of the training
plays; evaluation: the validation plays (othello, richard_iii), non-overlapping windows of
``--window`` bytes (stride = window), the first ``--max-windows`` of them. Prints a markdown table and
whether the paper's orderings hold (float < GPTQ4 < RTN4, GPTQ3 << RTN3), plus the kurtosis of the
block outputs of the float model (outlier-heavy activations have a large kurtosis).

Each row also gives KL(float || quantized), the mean per-token KL divergence of the quantized model's
next-byte distribution from the float model's on the same windows: the fidelity GPTQ optimises for,
which a perplexity gap can hide when the float model is mis-calibrated (a perturbation that flattens
an over-confident model's predictions lowers its perplexity). The float model's perplexity at a few
softmax temperatures is printed so that calibration can be read before the perplexity orderings are.
The "calibrated PPL" column removes that confound the same way for every row, float included
(temperature scaling, Guo et al., 2017): each model's logits are divided by the temperature that
minimises its NLL on the even-numbered evaluation windows, and the perplexity is taken on the
odd-numbered ones.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from train_shakespeare_lm import DATA, VALIDATION, split  # the same split as training (sibling script)

import efformer
from efformer.compress import FloatConfig, GPTQConfig, RTNConfig, W8A8Config, calibration_windows, quantize
from efformer.compress.evaluate import perplexity


@torch.no_grad()
def block_kurtosis(model, ids: torch.Tensor) -> float:
    """Mean over blocks of the kurtosis E[(x-mu)^4]/sigma^4 of each block's output entries."""
    ks = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: ks.append(_kurt(out[0]))) for b in model.backbone.blocks]
    model(ids)
    for h in hooks:
        h.remove()
    return sum(ks) / len(ks)


def _kurt(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    return (x.pow(4).mean() / x.pow(2).mean().square()).item()


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """(n, window - 1, vocab) next-byte log-probabilities of ``model`` on ``windows`` (n, window)."""
    return torch.cat([torch.log_softmax(model(windows[i:i + batch])[:, :-1].float(), -1)
                      for i in range(0, len(windows), batch)])


def nll_at(logp: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of ``targets`` (n, t) under ``logp`` (n, t, vocab) with the logits divided by ``temperature``."""
    return -torch.log_softmax(logp / temperature, -1).gather(-1, targets[..., None]).mean().item()


def fitted_temperature(logp: torch.Tensor, targets: torch.Tensor, lo: float = 0.25, hi: float = 4.0) -> float:
    """The temperature in [lo, hi] minimising ``nll_at`` (golden-section search; NLL is unimodal in it)."""
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll_at(logp, targets, a) < nll_at(logp, targets, b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def calibrated_ppl(logp: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(perplexity on the odd windows at the temperature fitted on the even ones, that temperature)."""
    t = fitted_temperature(logp[0::2], targets[0::2])
    return math.exp(nll_at(logp[1::2], targets[1::2], t)), t


def window_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) mean NLL of each evaluation window."""
    return -logp.gather(-1, targets[..., None])[..., 0].mean(-1)


def _paired(per_window: dict, name: str) -> str:
    d = per_window[name] - per_window["float"]
    return f"{d.mean().item():+.5f} +- {2 * d.std().item() / math.sqrt(len(d)):.5f}"


def kl_from(reference: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(reference || logp), both (n, t, vocab) log-probabilities."""
    return (reference.exp() * (reference - logp)).sum(-1).mean().item()


def configs() -> list[tuple[str, object]]:
    rows = []
    for bits in (8, 4, 3):
        for g, gname in ((128, "g128"), (-1, "per-channel")):
            rows.append((f"RTN int{bits} {gname}", RTNConfig(bits=bits, group_size=g)))
            rows.append((f"GPTQ int{bits} {gname}", GPTQConfig(bits=bits, group_size=g, act_order=True)))
    rows += [("W8A8 naive", W8A8Config()), ("W8A8 SmoothQuant a=0.5", W8A8Config(smoothing="smoothquant")),
             ("W8A8 OS+", W8A8Config(smoothing="osplus")),
             ("W8A8 + log2 attention probs 4-bit", W8A8Config(prob_bits=4)),
             ("float weights, log2 attention probs 4-bit", W8A8Config(prob_bits=4, quantize=False)),
             ("FP8 E4M3 per-channel", FloatConfig(format="fp8_e4m3")),
             ("FP8 E5M2 per-channel", FloatConfig(format="fp8_e5m2")),
             ("FP4 E2M1 MX (pow2 / 32)", FloatConfig(format="fp4_e2m1", scaling="mx")),
             ("FP4 E2M1 NV (fp8 / 16)", FloatConfig(format="fp4_e2m1", scaling="nv"))]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="/tmp/shakespeare-lm")
    p.add_argument("--data", default=str(DATA))
    # the training window of train_shakespeare_lm.py (--seq 128): longer windows measure RoPE extrapolation
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=200)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="run only rows whose name contains one of these")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, val = split(Path(args.data))
    base = efformer.load(args.model).eval()
    calib = calibration_windows(train, args.window, args.n_samples, seed=0)
    n = min(args.max_windows, len(val) // args.window)
    windows = val[: n * args.window].view(n, args.window)
    targets = windows[:, 1:]
    ref = log_probs(base, windows)
    ppl, kl = {"float": math.exp(nll_at(ref, targets))}, {"float": 0.0}
    per_window = {"float": window_nll(ref, targets)}
    cal, temp = {}, {}
    cal["float"], temp["float"] = calibrated_ppl(ref, targets)
    # the library's protocol (efformer.compress.evaluate.perplexity) scores the same tokens: a cross-check
    assert math.isclose(ppl["float"], perplexity(base, val, args.window, max_windows=n), rel_tol=1e-4)
    print(f"model {args.model}: {sum(p.numel() for p in base.parameters())} params; eval {n} windows "
          f"x {args.window} bytes of {', '.join(VALIDATION)}; calibration {args.n_samples} x {args.window} bytes")
    print(f"block-output kurtosis (float): {block_kurtosis(base, val[: 8 * args.window].view(8, -1)):.2f}")
    temps = (0.9, 1.0, 1.1, 1.2)
    print("float val PPL at softmax temperature " +
          ", ".join(f"{t}: {math.exp(nll_at(ref, targets, t)):.3f}" for t in temps) + "\n")
    print("| method | val PPL | calibrated PPL (T) | KL(float || q) x 1e3 | quantize s |\n|---|---|---|---|---|")
    print(f"| float | {ppl['float']:.3f} | {cal['float']:.3f} ({temp['float']:.2f}) | 0 | - |", flush=True)
    for name, cfg in configs():
        if args.only and not any(o in name for o in args.only):
            continue
        t0 = time.perf_counter()
        q = quantize(copy.deepcopy(base), cfg, calib)
        secs = time.perf_counter() - t0
        logp = log_probs(q, windows)
        ppl[name], kl[name] = math.exp(nll_at(logp, targets)), kl_from(ref, logp)
        per_window[name] = window_nll(logp, targets)
        cal[name], temp[name] = calibrated_ppl(logp, targets)
        print(f"| {name} | {ppl[name]:.3f} | {cal[name]:.3f} ({temp[name]:.2f}) | {1e3 * kl[name]:.3f} | {secs:.1f} |",
              flush=True)
    for g in ("g128", "per-channel"):
        for label, m in (("val PPL", ppl), ("calibrated PPL", cal), ("KL", kl)):
            r4, g4, r3, g3 = (m.get(f"{q} int{b} {g}") for q, b in (("RTN", 4), ("GPTQ", 4), ("RTN", 3), ("GPTQ", 3)))
            if None not in (r4, g4, r3, g3):
                lead = "\n" if label == "val PPL" else ""
                print(f"{lead}{g}, {label}: float < GPTQ4 < RTN4: {m['float'] < g4 < r4}; "
                      f"GPTQ3 << RTN3 (gap GPTQ3-float at most half of RTN3-float): "
                      f"{g3 - m['float'] <= 0.5 * (r3 - m['float'])}")
        for b in (4, 3):  # how far apart the perplexities are, beside the evaluation's own resolution
            rows = [f"{q} int{b} {g}" for q in ("RTN", "GPTQ") if f"{q} int{b} {g}" in per_window]
            print(f"{g} int{b}, NLL minus float's, mean +- 2 paired standard errors over the windows: "
                  + "; ".join(f"{r.split()[0]} {_paired(per_window, r)}" for r in rows))

if __name__ == "__main__":
    main()
