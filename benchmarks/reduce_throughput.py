"""Token reduction with no fine-tuning: throughput, FLOPs and accuracy against r, per method.

Trains (once, cached under ``--cache``) a ``vit-tiny`` on scikit-learn's digits (32 x 32, one channel:
64 patches + class token, 4 blocks) and a text ``SequenceClassifier`` on a longer ListOps than the
arena's quick preset (``--listops-len`` tokens at most, 4 blocks) or, with ``--text-task pixels``, on
the LRA image task's input format (one grey intensity token per pixel: digits resized to
``--pixel-side``, 24 giving 576 tokens, or CIFAR-10 with ``--cifar DIR``; 4 blocks of width
``--text-width``, mean pooling, ``--text-positional`` positions, ``--text-steps`` of batch 16 at peak lr
``--text-lr``; the cache folder's name holds that recipe), then for every method and r in
``--rs`` attaches :func:`efformer.reduce.apply`, and measures images (sequences) per second on
``--batch`` inputs (median of ``--repeat``; the speed-up is the median ratio of plain and reduced runs
timed back to back), forward FLOPs per input (``torch.utils.flop_counter``: the
blocks plus the methods' own matmuls) and test accuracy. One run on a CPU that others share: compare
ratios within one table, not across runs. The trainable methods (``--methods ltm ia_red2 clca``) first
train their own modules for ``--tune-steps`` steps with the backbone frozen (a short pass, not a
fine-tuning of the model).

``--where`` picks the placement (``mid``: ToMe's, inside each block between attention and MLP;
``between``: after each block). ``--depth`` / ``--width`` make the ViT deeper or wider (ToMe's
speed-ups come from many reduction points: ViT-S has 12 blocks). ``--swin`` adds a ``swin-tiny``
table with windowed merging (r per window of 4 x 4 tokens); ``--clusters`` adds Expediting-ViT rows
(token clustering into an s x s grid after block ``--cluster-at``, reconstructed after the last).

    PYTHONPATH=src python benchmarks/reduce_throughput.py --cache runs/reduce_bench --rs 0 4 8 16
    PYTHONPATH=src python benchmarks/reduce_throughput.py --skip image --text-task pixels --pixel-side 24 \
        --text-steps 1000 --text-lr 2e-3 --rs 0 96 144 168 192 --batch 32 --repeat 5
    PYTHONPATH=src python benchmarks/reduce_throughput.py --depth 12 --width 96 --skip text --swin \
        --swin-rs 1 2 4 6 --clusters 4 6

The pixel-token recipe above (24 x 24 digits, width 32, learned positions, 1000 steps at 2e-3) reaches
0.808 test accuracy (majority class 0.117; one test sequence = 0.28 points) in 22 minutes on a busy
core. At 32 x 32 (LRA's 1024 tokens) the loss stayed at ln 10 for 300 steps at 1e-3 (sinusoidal
positions) and for 120 steps at 3e-3 (learned), at 1-3.5 s a step: not learnable in a session here.
Its text table (the command above with ``--rs 0 96 144 168 192``, all five methods), one run on 2
cores at load 1-3; speed-up / FLOPs saved / change in points:

    | method             | r=96                 | r=144               | r=168               | r=192               |
    | tome               | 1.05x / 17% / -0.3   | 1.51x / 35% / -0.6  | 1.38x / 41% / -1.1  | 1.72x / 46% / -1.4  |
    | pitome             | 0.30x / -34% / -0.6  | 0.37x / -4% / -1.1  | 0.37x / 5% / +0.0   | 0.44x / 13% / -0.8  |
    | zero_tprune        | 0.12x / -266% / +0.8 | 0.15x / -185% / -0.6 | 0.15x / -161% / -2.5 | 0.16x / -139% / -5.8 |
    | mctf               | 0.24x / -141% / -0.3 | 0.31x / -91% / -0.6 | 0.33x / -76% / -0.6 | 0.34x / -62% / +0.0 |
    | token_transforming | 0.12x / -328% / -1.1 | 0.16x / -218% / -1.1 | 0.18x / -186% / -0.8 | 0.19x / -157% / -1.4 |

ToMe >= 1.5x at <= 1 point: true, narrowly (1.51x at -0.6 at r=144; r=168 read 1.38x in the same run, so
the speed-ups carry about +-0.15 of noise; an earlier run at load 5-7 read 1.39x at r=144). PiToMe loses
no more than ToMe at equal r at r=168 and 192, more at 96 and 144. Zero-TPrune >= 35% fewer FLOPs at <= 0.5
point: false. At width 32 every successor's token-to-token scores (t x t per reduction point: energy,
PageRank, one-step-ahead attention, the transformation matrix) cost as much as the blocks they shrink, so
they cost more FLOPs than no reduction; at real widths (384+) that term is a small fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import efformer
from efformer import reduce
from efformer.arena.tasks import build_datasets, get_task
from efformer.bench.perf import time_ms
from efformer.data.images import digits, token_images
from efformer.data.loaders import read_cifar10
from efformer.train.data import collate

METHODS = ["tome", "pitome", "zero_tprune", "mctf", "token_transforming"]
# trainable ones (reduce.learned, reduce.cache): their own modules get --tune-steps steps first, backbone frozen
TRAINABLE = ["ltm", "ia_red2", "clca"]


def train(model, batches, steps: int, lr: float) -> float:
    """AdamW with a one-cycle cosine schedule (10% warmup) for ``steps`` batches from ``batches()``; prints
    the mean loss of each tenth of the run; returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 2), pct_start=0.1)
    model.train()
    start, losses, every = time.perf_counter(), [], max(steps // 10, 1)
    for step in range(1, steps + 1):
        inputs, labels = batches()
        loss = F.cross_entropy(model(inputs[0], **inputs[1]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:  # a long training's only sign of life (and of learning)
            print(f"  step {step}/{steps}: loss {statistics.fmean(losses):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            losses = []
    model.eval()
    return time.perf_counter() - start


def cached(path: Path, make, fit):
    """The model saved at ``path``, or a new one from ``make()`` trained by ``fit`` and saved there."""
    if (path / "config.json").exists():
        return efformer.load(path).eval(), "cached"
    torch.manual_seed(0)
    model = make()
    seconds = fit(model)
    efformer.save(model, path)
    return model.eval(), f"trained in {seconds:.0f} s"


def image_task(args, preset: str = "vit-tiny"):
    train_set, test_set = digits(32).split(0.8, seed=0)
    gen = torch.Generator().manual_seed(0)

    def batches():
        idx = torch.randint(0, len(train_set), (32,), generator=gen)
        return (train_set.images[idx], {}), train_set.labels[idx]
    overrides, name = {}, f"{preset}-digits"
    if preset == "vit-tiny" and (args.depth, args.width) != (4, 64):  # one stage: depth blocks of width d
        overrides["stages"] = [dict(depth=args.depth, d_model=args.width, n_heads=max(args.width // 16, 1))]
        name = f"vit-d{args.depth}-w{args.width}-digits"
    model, how = cached(Path(args.cache) / name, lambda: efformer.create_model(preset, in_channels=1, **overrides),
                        lambda m: train(m, batches, args.image_steps, 3e-3))
    x_speed = test_set.images[torch.arange(args.batch) % len(test_set)]
    return model, how, [((test_set.images,), {}, test_set.labels)], ((x_speed,), {}), batches


def pixel_task(args):
    """The LRA image task's input format (one grey 8-bit intensity token per pixel, row-major, as
    ``efformer arena``'s image cells and ``vision_accuracy.py --patch 1`` read them) for the text
    SequenceClassifier: digits resized to ``--pixel-side`` (32: LRA's 1024 tokens), or with ``--cifar DIR``
    the LRA image task itself on the user's CIFAR-10 files."""
    side = args.pixel_side
    if args.cifar:  # LRA's grey CIFAR-10 (read_cifar10's split: train, val, test_batch), 32 x 32
        cifar_train, _, cifar_test = read_cifar10(args.cifar)
        tr, te, side, name = token_images(cifar_train, 32), token_images(cifar_test, 32), 32, "pixels-cifar"
    else:
        (tr, te), name = digits(side).split(0.8, seed=0), f"pixels-digits{side}"
    # back to the 8-bit intensities the tokens are (exact for CIFAR's uint8 pixels)
    train_x, train_y = (tr.images * 255).round().long().flatten(1), tr.labels
    test_x, test_y = (te.images * 255).round().long().flatten(1), te.labels
    spec = get_task("image", "quick")
    # 4 blocks (reduction points) of width --text-width (a head per 16 channels), mean pooling
    w = args.text_width
    cfg = spec.model_config(max_len=side * side + 1, n_layers=4, d_model=w, n_heads=max(w // 16, 1), ffn_mult=2.0,
                            dropout=0.0, pooling="mean", positional=args.text_positional)
    gen = torch.Generator().manual_seed(0)

    def batches():
        idx = torch.randint(0, len(train_y), (16,), generator=gen)
        return (train_x[idx], {}), train_y[idx]
    # the whole recipe in the name: a cached model is never one trained another way
    name += f"-w{w}-{args.text_positional}-lr{args.text_lr:g}-s{args.text_steps}"
    model, how = cached(Path(args.cache) / name, lambda: efformer.create_model(cfg),
                        lambda m: train(m, batches, args.text_steps, args.text_lr))
    evals = [((test_x[s:s + 100],), {}, test_y[s:s + 100]) for s in range(0, len(test_y), 100)]
    majority = torch.bincount(test_y).max().item() / len(test_y)
    how += f"; {len(test_y)} test sequences of {side * side} tokens, majority class {majority:.3f}"
    return model, how, evals, ((test_x[torch.arange(args.batch) % len(test_y)],), {}), batches


def text_task(args):
    if args.text_task == "pixels":
        return pixel_task(args)
    base = get_task("listops", "quick")
    n = args.listops_len
    data = dict(base.data, min_len=n // 2, max_len=n, max_depth=6, n_train=3000, n_val=200, n_test=500)
    spec = dataclasses.replace(base, seq_len=n, data=data,
                               model=dict(base.model, n_layers=4))
    train_set, _, test_set = build_datasets(spec, data_dir=Path(args.cache) / "data")
    gen = torch.Generator().manual_seed(0)

    def batch_of(examples):
        b = collate(examples)
        return (b["input_ids"],), {"mask": b["mask"]}, b["label"]

    def batches():
        idx = torch.randint(0, len(train_set), (32,), generator=gen).tolist()
        (ids,), kw, y = batch_of([train_set[i] for i in idx])
        return (ids, kw), y
    make = lambda: efformer.create_model(spec.model_config())  # noqa: E731
    model, how = cached(Path(args.cache) / f"listops{n}", make, lambda m: train(m, batches, args.text_steps, 3e-3))
    evals = [batch_of([test_set[i] for i in range(s, min(s + 100, len(test_set)))])
             for s in range(0, len(test_set), 100)]
    speed_ids, speed_kw, _ = batch_of([test_set[i % len(test_set)] for i in range(args.batch)])
    return model, how, evals, (speed_ids, speed_kw), batches


@torch.no_grad()
def measure(model, evals, speed_in, batch: int, repeat: int, paired=None) -> tuple[float, float, float, float]:
    """(inputs per second, speed-up over the plain model, forward GFLOPs per input, test accuracy).

    The speed-up is the median of ``repeat`` ratios, each of a plain run and a reduced run timed back
    to back (``paired``: (apply, remove) the reduction), so load that changes between configurations of
    a shared machine cancels out of it."""
    correct = total = 0
    for args, kw, y in evals:
        correct += int((model(*args, **kw).argmax(-1) == y).sum())
        total += len(y)

    def run():
        return model(*speed_in[0], **speed_in[1])
    ms = time_ms(run, warmup=1, repeat=repeat)
    ratios = []
    if paired is not None:
        for _ in range(repeat):
            paired[1]()
            plain = time_ms(run, warmup=0, repeat=1)
            paired[0]()
            ratios.append(plain / time_ms(run, warmup=0, repeat=1))
    with FlopCounterMode(display=False) as fc:
        run()
    return batch / ms * 1e3, statistics.median(ratios or [1.0]), fc.get_total_flops() / batch / 1e9, correct / total


def tune(model, method, batches, steps: int) -> None:
    """``steps`` AdamW steps on the reduction's own modules only (the backbone stays as trained), with the
    method's loss terms (LTM's KL, IA-RED²'s REINFORCE) added to the cross-entropy."""
    own = [p for n, p in model.named_parameters() if n.startswith(("reduce_learned", "reduce_cache"))]
    opt = torch.optim.AdamW(own, 3e-3)
    model.train()
    for _ in range(steps):
        inputs, labels = batches()
        method.clear()
        logits = model(inputs[0], **inputs[1])
        loss = (F.cross_entropy(logits, labels, reduction="none") + method.extra_loss(logits, labels)).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()


def table(name, model, how, evals, speed_in, batches, args, methods=None, rs=None, clusters=()) -> None:
    methods, rs = methods or args.methods, rs or args.rs
    print(f"\n### {name} ({how}); batch {args.batch}, median of {args.repeat}, where={args.where}")
    print("| method | r | tokens per block | inputs/s | speed-up | GFLOPs | FLOPs saved | accuracy | change (pts) |")
    print("|---|---|---|---|---|---|---|---|---|")
    reduce.remove(model)
    base_ips, _, base_fl, base_acc = measure(model, evals, speed_in, args.batch, args.repeat)
    print(f"| none | 0 | - | {base_ips:.0f} | 1.00x | {base_fl:.4f} | 0% | {base_acc:.3f} | 0.0 |")
    rows = {}
    runs = [(m, r, lambda m=m, r=r: reduce.apply(model, m, r, where=args.where)) for m in methods for r in rs if r]
    at = min(args.cluster_at, len(model.stages[0]) - 1) if hasattr(model, "stages") else 0
    runs += [("cluster", f"{c}x{c}", lambda c=c: reduce.cluster_apply(model, (c, c), at=at)) for c in clusters]
    for method, r, attach in runs:
        red = attach()
        if method in TRAINABLE:  # trained once; apply keeps a trained instance's weights on re-attach
            m = red.method
            tune(model, m, batches, args.tune_steps)
            attach = lambda m=m, r=r: reduce.apply(model, m, r, where=args.where)  # noqa: E731
        paired = (attach, lambda: reduce.remove(model))
        ips, speedup, fl, acc = measure(model, evals, speed_in, args.batch, args.repeat, paired)
        rows[method, r] = (speedup, 1 - fl / base_fl, (acc - base_acc) * 100)
        print(f"| {method} | {r} | {'>'.join(map(str, red.last.counts))} | {ips:.0f} | {speedup:.2f}x | "
              f"{fl:.4f} | {100 * (1 - fl / base_fl):.0f}% | {acc:.3f} | {(acc - base_acc) * 100:+.1f} |")
    reduce.remove(model)
    tome = [(r, s, d) for (m, r), (s, _, d) in rows.items() if m == "tome"]
    hit = [r for r, s, d in tome if s >= 1.5 and d >= -1.0]
    print(f"\nToMe >= 1.5x throughput at <= 1 point loss: {bool(hit)} (r = {hit})")
    if "pitome" not in methods or "zero_tprune" not in methods:
        return
    pit = [(r, rows["pitome", r][2] >= rows["tome", r][2]) for r in rs if ("pitome", r) in rows]
    print(f"PiToMe loses no more than ToMe at equal r (equal FLOPs up to its energy term): "
          f"{sum(ok for _, ok in pit)}/{len(pit)} values of r {pit}")
    zt = [(r, f"{100 * s:.0f}%", f"{d:+.1f}") for (m, r), (_, s, d) in rows.items() if m == "zero_tprune"]
    ok = any(float(s[:-1]) >= 35 and float(d) >= -0.5 for _, s, d in zt)
    print(f"Zero-TPrune >= 35% fewer FLOPs at <= 0.5 point loss: {ok} (r, FLOPs saved, change: {zt})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="runs/reduce_bench", help="folder for the trained models and ListOps data")
    ap.add_argument("--rs", type=int, nargs="+", default=[0, 2, 4, 8, 12, 16, 24])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + TRAINABLE)
    ap.add_argument("--tune-steps", type=int, default=100, help="steps of the trainable methods' own modules")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--image-steps", type=int, default=400)
    ap.add_argument("--text-steps", type=int, default=300)
    ap.add_argument("--listops-len", type=int, default=256)
    ap.add_argument("--text-task", default="listops", choices=["listops", "pixels"],
                    help="the text classifier's task: ListOps, or the LRA image format (pixel tokens)")
    ap.add_argument("--pixel-side", type=int, default=32, help="digits resized to side x side pixel tokens")
    ap.add_argument("--text-width", type=int, default=32, help="with --text-task pixels: the classifier's width")
    ap.add_argument("--text-lr", type=float, default=1e-3, help="with --text-task pixels: peak learning rate")
    ap.add_argument("--text-positional", default="learned", choices=["learned", "sinusoidal"],
                    help="with --text-task pixels: absolute positions added to the pixel embeddings")
    ap.add_argument("--cifar", type=Path, default=None, help="with --text-task pixels: DIR/cifar-10-batches-bin")
    ap.add_argument("--skip", nargs="*", default=[], choices=["image", "text"])
    ap.add_argument("--where", default="mid", choices=["mid", "between"], help="where the tokens are merged")
    ap.add_argument("--depth", type=int, default=4, help="blocks of the image ViT (vit-tiny: 4)")
    ap.add_argument("--width", type=int, default=64, help="width of the image ViT (vit-tiny: 64; heads = width / 16)")
    ap.add_argument("--swin", action="store_true", help="add swin-tiny with windowed ToMe (needs --where mid)")
    ap.add_argument("--swin-rs", type=int, nargs="+", default=[0, 1, 2, 4, 6], help="r per 4x4 window")
    ap.add_argument("--clusters", type=int, nargs="*", default=[], help="Expediting-ViT cluster grid sides")
    ap.add_argument("--cluster-at", type=int, default=1, help="blocks on the full grid before clustering")
    args = ap.parse_args(argv)
    if args.swin and args.where != "mid":
        ap.error("--swin merges inside each window between attention and MLP: use --where mid")
    torch.manual_seed(0)
    if "image" not in args.skip:
        table(f"ViT ({args.depth} blocks, width {args.width}) on digits", *image_task(args), args,
              clusters=args.clusters)
        if args.swin:
            table("swin-tiny on digits (windowed ToMe, r per window)", *image_task(args, "swin-tiny"), args,
                  methods=["tome"], rs=args.swin_rs)
    if "text" not in args.skip:
        what = (f"ListOps (up to {args.listops_len} tokens)" if args.text_task == "listops" else
                "pixel tokens (LRA image format)")
        table(f"SequenceClassifier on {what}", *text_task(args), args)


if __name__ == "__main__":
    main()
