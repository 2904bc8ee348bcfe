"""GPTQ vs RTN on GPTQ's own layer objective, on calibration AND held-out activations, layer by layer.

Usage: ``python benchmarks/gptq_layer_objective.py --model /tmp/lm13/plain``. Every target linear of the
float model sees (a) ``--n-samples`` calibration windows of the training plays and (b) ``--val-windows``
windows of the validation plays; each gives a Hessian H = 2/n X^T X. A layer's objective for a
quantized weight Q is tr((W-Q) H (W-Q)^T) = (2/n) ||(W-Q) X^T||^2, printed relative to RTN's on the
same activations (ratio < 1: GPTQ wins). GPTQ uses only the calibration Hessian; the held-out column
shows whether what it fits there carries over (a method that wins on calibration and loses held-out
overfits the calibration set). All inputs come from the float model, so each layer is judged alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from train_shakespeare_lm import DATA, split  # the same split as training (sibling script)

import efformer
from efformer.compress import calibration_windows, default_filter
from efformer.compress.calibration import HessianObserver, observe
from efformer.compress.gptq import gptq_quantize
from efformer.compress.rtn import rtn_quantize, weight_format


def objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): GPTQ's ||(W - Q) X^T||^2 up to the constant 2/n."""
    d = (w - q).double()
    return (d @ h * d).sum().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="/tmp/lm13/plain")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--n-samples", type=int, nargs="+", default=[128],
                   help="calibration window counts to compare (GPTQ's Hessian from each)")
    p.add_argument("--val-windows", type=int, default=400)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--groups", type=int, nargs="+", default=[-1, 128])
    p.add_argument("--percdamp", type=float, nargs="+", default=[0.01])
    p.add_argument("--act-order", type=int, nargs="+", default=[0, 1])
    p.add_argument("--per-layer", action="store_true", help="print every layer, not only the totals")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, val = split(Path(args.data))
    model = efformer.load(args.model).eval()
    lins = {n: m for n, m in model.named_modules() if default_filter(n, m)}
    n_val = min(args.val_windows, val.numel() // args.window)
    h_val = {n: o.h for n, o in observe(model, val[: n_val * args.window].view(n_val, -1), lins,
                                        HessianObserver).items()}
    h_cal = {}
    for ns in args.n_samples:
        obs = observe(model, calibration_windows(train, args.window, ns, seed=0), lins, HessianObserver)
        h_cal[ns] = {n: o.h for n, o in obs.items()}
    print(f"model {args.model}; held-out: {n_val} x {args.window} bytes of validation; objective ratios "
          "GPTQ / RTN (sum over layers, and the worst layer), calibration | held-out\n")
    print("| bits | group | n_samples | percdamp | act-order | calib sum | calib worst | held-out sum | "
          "held-out worst | layers lost held-out |\n|---|---|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for g in args.groups:
            fmt = weight_format(bits, g, False)
            rtn = {n: rtn_quantize(m.weight, fmt).dequantize() for n, m in lins.items()}
            for ns in args.n_samples:
                for pd in args.percdamp:
                    for ao in args.act_order:
                        rows, sums = [], [0.0, 0.0, 0.0, 0.0]  # gptq cal, rtn cal, gptq val, rtn val
                        for n, m in lins.items():
                            w = m.weight.detach().float()
                            q = gptq_quantize(w, h_cal[ns][n], fmt, act_order=bool(ao), percdamp=pd).dequantize()
                            e = [objective(w, q, h_cal[ns][n]), objective(w, rtn[n], h_cal[ns][n]),
                                 objective(w, q, h_val[n]), objective(w, rtn[n], h_val[n])]
                            sums = [a + b for a, b in zip(sums, e, strict=True)]
                            rows.append((n, e[0] / e[1], e[2] / e[3]))
                        worst_c, worst_v = max(r[1] for r in rows), max(r[2] for r in rows)
                        lost = sum(r[2] >= 1 for r in rows)
                        print(f"| {bits} | {g} | {ns} | {pd} | {ao} | {sums[0] / sums[1]:.3f} | {worst_c:.3f} | "
                              f"{sums[2] / sums[3]:.3f} | {worst_v:.3f} | {lost}/{len(rows)} |", flush=True)
                        if args.per_layer:
                            for n, rc, rv in rows:
                                print(f"|  | {n} | | | | {rc:.3f} | | {rv:.3f} | | |")


if __name__ == "__main__":
    main()
