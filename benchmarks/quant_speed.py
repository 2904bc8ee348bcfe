"""Speed and weight memory of low-bit linears on this CPU: fp32 vs int8 weight-only vs W8A8 vs packed int4,
beside torchao's CPU paths on the same layer; then whole-model ``generate`` tokens/s.

Usage: ``python benchmarks/quant_speed.py --dims 1024 --tokens 1 16 256 [--model /tmp/shakespeare-lm]``.
Median of ``--repeat`` timed calls after warm-up, eager mode (no torch.compile: torchao is known to be
slow without it). Timings on a shared machine are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import efformer
from efformer.compress import RTNConfig, W8A8Config, quantize
from efformer.compress.qlinear import IntWeightLinear, W8A8Linear
from efformer.compress.rtn import rtn_quantize, weight_format


def weight_bytes(m: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the layer keeps resident)."""
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after two warm-up calls."""
    with torch.no_grad():
        fn()
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def layers(lin: nn.Linear) -> dict[str, nn.Module]:
    out = {"fp32": lin,
           "int8 weight-only": IntWeightLinear.from_quantized(rtn_quantize(lin.weight, weight_format(8, -1, True)),
                                                              lin.bias),
           "W8A8 dynamic": W8A8Linear.from_linear(lin.weight, lin.bias),
           "int4 g128 packed": IntWeightLinear.from_quantized(rtn_quantize(lin.weight, weight_format(4, 128, False)),
                                                              lin.bias)}
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )
    except ImportError:
        return out
    for name, cfg in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                      ("torchao W8A8", Int8DynamicActivationInt8WeightConfig()),
                      ("torchao int4 g128 (intx)", IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                        granularity=PerGroup(128)))):
        m = nn.Sequential(copy.deepcopy(lin))
        quantize_(m, cfg)
        out[name] = m
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", type=int, nargs="+", default=[1024])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="a saved LM for the generate comparison")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    for d in args.dims:
        torch.manual_seed(0)
        lin = nn.Linear(d, d)
        mods = layers(lin)
        print(f"linear {d}x{d}: median ms per call (weight MiB)\n")
        print("| layer | MiB | " + " | ".join(f"{m} tok" for m in args.tokens) + " |")
        print("|---|---|" + "---|" * len(args.tokens))
        for name, m in mods.items():
            cells = []
            for n in args.tokens:
                x = torch.randn(n, d)
                cells.append(f"{timed(lambda m=m, x=x: m(x), args.repeat) * 1e3:.3f}")
            # torchao's tensor subclasses report their inner tensors through their own accounting
            mib = weight_bytes(m) / 2**20 if not name.startswith("torchao") else float("nan")
            print(f"| {name} | {mib:.2f} | " + " | ".join(cells) + " |", flush=True)
        print()
    if args.model:
        base = efformer.load(args.model).eval()
        prompt = torch.randint(1, 256, (1, 16))
        print(f"generate {args.new_tokens} tokens (batch 1, greedy, KV cache) with {args.model}\n")
        print("| model | weight MiB | tokens/s |\n|---|---|---|")
        for name, cfg in (("fp32", None), ("int8 weight-only", RTNConfig(bits=8, group_size=-1, symmetric=True)),
                          ("W8A8", W8A8Config()), ("int4 g128", RTNConfig(bits=4, group_size=128))):
            m = base if cfg is None else quantize(copy.deepcopy(base), cfg)
            secs = timed(lambda m=m: m.generate(prompt, max_new_tokens=args.new_tokens), max(3, args.repeat // 5))
            print(f"| {name} | {weight_bytes(m) / 2**20:.2f} | {args.new_tokens / secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
