"""Image models: forward+backward time and peak memory vs resolution, and accuracy on digits after a
fixed CPU budget.

Every model is the same isotropic stack (patch 4, width 64, 4 heads, ``--depth`` blocks, mean pooling)
with only the token mixer changed, so the figures compare mixers: ViT (softmax), Swin windows (7, plain
and shifted), PVT spatial reduction (ratio 4), neighbourhood attention (7 x 7), PoolFormer pooling and
Vision Mamba (two selective scans).
Peak memory is the largest tensor any torch call returned during one forward+backward (the score
matrix of attention dominates), measured by a TorchFunctionMode; wall time is the median of
``--repeat`` runs. Timings on a shared machine are noisy: compare ratios within one run.

    PYTHONPATH=src python benchmarks/vision_resolution.py --sizes 32 64 --repeat 2 --accuracy-seconds 20
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import efformer
from efformer.bench.perf import time_ms
from efformer.data.images import digits

MIXERS = {
    "vit (softmax)": ("softmax", {}),
    "swin (w7)": ("swin", [{"window": 7, "shift": 0}, {"window": 7, "shift": 3}]),
    "pvt (sra r4)": ("sra", {"ratio": 4}),
    "nat (k7)": ("neighborhood", {"kernel": 7}),
    "poolformer": ("pool", {}),
    "vim (bidir. mamba)": ("vim", {"d_state": 8}),
}


class _Largest(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def build(mixer: str, options, depth: int, size: int, channels: int = 3, n_classes: int = 10):
    """The isotropic image model with ``mixer`` in every block."""
    opts = options if isinstance(options, dict) else (options * depth)[:depth]
    return efformer.create_model("vit-tiny", image_size=size, in_channels=channels, n_classes=n_classes,
                                 pooling="mean", positional="learned",
                                 stages=[dict(depth=depth, d_model=64, n_heads=4, mixer=mixer, mixer_options=opts)])


def speed(sizes: list[int], depth: int, batch: int, repeat: int) -> None:
    print(f"| model | {' | '.join(f'{s}px ({(s // 4) ** 2} tok) ms / MB' for s in sizes)} |")
    print(f"|---|{'---|' * len(sizes)}")
    growth = {}
    for label, (mixer, opts) in MIXERS.items():
        cells, times = [], []
        for s in sizes:
            torch.manual_seed(0)
            model = build(mixer, opts, depth, s)
            x = torch.rand(batch, 3, s, s)

            def step(model=model, x=x):
                model(x).sum().backward()
                model.zero_grad(set_to_none=True)

            with _Largest() as big:
                step()
            times.append(time_ms(step, warmup=1, repeat=repeat))
            cells.append(f"{times[-1]:.0f} / {big.bytes / 2**20:.1f}")
        print(f"| {label} | {' | '.join(cells)} |")
        growth[label] = times
    if len(sizes) >= 2:  # time ~ tokens^e between the two largest sizes: ~1 for windowed/linear, ~2 for ViT
        n0, n1 = ((s // 4) ** 2 for s in sizes[-2:])
        print(f"\ngrowth exponent e (time ~ tokens^e) from {n0} to {n1} tokens:")
        for label, t in growth.items():
            print(f"- {label}: e = {math.log(t[-1] / t[-2]) / math.log(n1 / n0):.2f}")


def train_for(model, x, y, lr: float, seed: int, seconds: float, steps_cap: int = 0, inputs=lambda t: t) -> int:
    """AdamW on random batches of 32 of (x, y) for ``steps_cap`` steps or else ``seconds``; the steps taken."""
    opt = torch.optim.AdamW(model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    steps, start = 0, time.perf_counter()
    model.train()
    while (steps < steps_cap) if steps_cap else (time.perf_counter() - start < seconds):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = F.cross_entropy(model(inputs(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps


def accuracy(seconds: float, steps_cap: int, depth: int, seed: int) -> None:
    train, test = digits(32).split(0.8, seed=seed)
    budget = f"{steps_cap} steps" if steps_cap else f"{seconds:.0f} s of CPU training"
    print(f"\ndigits 32x32 (1 channel), {budget} each, batch 32, AdamW 3e-3, seed {seed}")
    print("| model | steps | seconds | test accuracy |\n|---|---|---|---|")
    for label, (mixer, opts) in MIXERS.items():
        torch.manual_seed(seed)
        model = build(mixer, opts, depth, 32, channels=1)
        start = time.perf_counter()
        steps = train_for(model, train.images, train.labels, 3e-3, seed, seconds, steps_cap)
        model.eval()
        with torch.no_grad():
            acc = (model(test.images).argmax(-1) == test.labels).float().mean().item()
        print(f"| {label} | {steps} | {time.perf_counter() - start:.0f} | {acc:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--accuracy-seconds", type=float, default=60.0, help="CPU seconds of training per model (0: skip)")
    ap.add_argument("--accuracy-steps", type=int, default=0,
                    help="train each model this many steps instead (fairer than seconds on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    speed(args.sizes, args.depth, args.batch, args.repeat)
    if args.accuracy_seconds > 0 or args.accuracy_steps > 0:
        accuracy(args.accuracy_seconds, args.accuracy_steps, args.depth, args.seed)


if __name__ == "__main__":
    main()
