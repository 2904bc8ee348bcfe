"""2-D image models beside the arena's 1-D mixers on the same images: test accuracy after a fixed CPU budget.

With ``--patch 1`` both kinds are built exactly as ``efformer arena`` builds its cells for a pixel task
(quick preset's Pathfinder spec: width 32, 1 layer, 4 heads, FFN 64): a 1-D mixer reads the image as
1024 pixel tokens (``arena.runner.model_config``: text classifier, learned positions), a 2-D mixer as a
32 x 32 grid of one-pixel patches (``arena.runner.image_model_config``). With ``--patch p`` > 1 (the
default, 4: 64 tokens, so that a busy CPU takes enough steps in the budget) every model is that image
model with p x p patches, the 1-D mixers reading the patch tokens row-major: only the mixer differs.
Tasks: Pathfinder-32 (quick preset's "easy" level, generated offline, 1500 images, 80/10/10 split),
scikit-learn's digits resized to 32 x 32 (1438 train / 359 test), and with ``--cifar DIR`` the LRA image
task on CIFAR-10 files the user gives (``DIR/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``;
grey as in LRA; 45000 train / 10000 test). Every model trains for ``--seconds`` of wall time (or
``--steps`` steps; batch 32, AdamW 2e-3), then is scored on the test split, once per seed of
``--seeds``; the table gives each seed's accuracy and their mean and standard deviation. A seed sets
the weights, the batches and, for Pathfinder and digits, the generated images and the split. The 1-D mixers are
the LRA paper's best on Pathfinder (Linformer, BigBird; Transformer as the reference) plus S4D, the
state-space family that is strongest there; the 2-D ones are Swin windows, PVT spatial reduction,
neighbourhood attention and PoolFormer pooling.
On a shared machine the step counts vary: compare steps as well as accuracy.

    PYTHONPATH=src python benchmarks/vision_accuracy.py --seconds 20            # patch 4, seed 0
    PYTHONPATH=src python benchmarks/vision_accuracy.py --seconds 120 --seeds 0 1 2 --cifar ~/data
    PYTHONPATH=src python benchmarks/vision_accuracy.py --seconds 120 --patch 1  # the arena's cells
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vision_resolution import train_for  # noqa: E402  (the same training loop as the digits figure)

from efformer.arena.runner import image_model_config, model_config
from efformer.arena.tasks import build_datasets, get_task
from efformer.data.images import digits, token_images
from efformer.data.loaders import read_cifar10
from efformer.errors import EfformerError
from efformer.models.factory import create_model

ONE_D = ("softmax", "linformer", "bigbird", "s4d")
TWO_D = {"swin": {"window": 7}, "sra": {"ratio": 4}, "neighborhood": {"kernel": 7}, "pool": {}}


def _images(task: str, seed: int, cifar: Path | None = None):
    """(train, test) as (images (n, 1, 32, 32) in [0, 1], labels) for pathfinder, digits or cifar."""
    if task == "cifar":  # LRA's split: the last 10% of the training batches validate, test_batch tests
        train, _, test = read_cifar10(cifar)
        train, test = token_images(train, 32), token_images(test, 32)
        return (train.images, train.labels), (test.images, test.labels)
    if task == "digits":
        train, test = digits(32).split(0.8, seed=seed)
        return (train.images, train.labels), (test.images, test.labels)
    with tempfile.TemporaryDirectory() as tmp:
        train, _, test = build_datasets("pathfinder", "quick", data_dir=tmp, seed=seed)
        train, test = token_images(train, 32), token_images(test, 32)
    return (train.images, train.labels), (test.images, test.labels)


def _model(mixer: str, n_classes: int, patch: int):
    spec = get_task("pathfinder", "quick")
    if mixer in TWO_D or patch > 1:
        cfg = image_model_config(spec, mixer).model_dump()
        cfg.update(n_classes=n_classes, patch_size=patch)
        cfg["stages"][0]["mixer_options"] = TWO_D.get(mixer, {})
        return create_model(cfg), True
    cfg = model_config(spec, mixer).model_dump()
    cfg["n_classes"] = n_classes
    return create_model(cfg), False


def _inputs(images: torch.Tensor, as_grid: bool) -> torch.Tensor:
    """Images for an image model, or their 8-bit intensities as one token per pixel (row-major)."""
    return images if as_grid else (images * 255).round().long().flatten(1)


def score(mixer: str, data, seed: int, seconds: float, steps_cap: int, patch: int) -> tuple[int, float]:
    """(steps taken, test accuracy) of ``mixer`` trained from seed ``seed`` on ``data`` = (train, test)."""
    (x_tr, y_tr), (x_te, y_te) = data
    torch.manual_seed(seed)
    model, as_grid = _model(mixer, int(max(y_tr.max(), y_te.max())) + 1, patch)
    steps = train_for(model, x_tr, y_tr, 2e-3, seed, seconds, steps_cap, inputs=lambda t: _inputs(t, as_grid))
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(_inputs(x_te[i:i + 64], as_grid)).argmax(-1) for i in range(0, len(y_te), 64)])
    return steps, (pred == y_te).float().mean().item()


def run(task: str, seconds: float, steps_cap: int, seeds: list[int], patch: int, mixers: list[str],
        cifar: Path | None = None) -> None:
    """Print one markdown table for ``task``: per model, each seed's steps / accuracy, then mean and sd."""
    data = {seed: _images(task, seed, cifar) for seed in seeds}
    (_, y_tr), (_, y_te) = data[seeds[0]]
    budget = f"{steps_cap} steps" if steps_cap else f"{seconds:.0f} s"
    print(f"\n{task}: {len(y_tr)} train / {len(y_te)} test, {budget} each, seeds {seeds}, "
          f"{(32 // patch) ** 2} tokens of {patch}x{patch} pixels; cells are steps / test accuracy")
    print("| model | kind | " + " | ".join(f"seed {s}" for s in seeds) + " | mean acc | sd |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")
    for mixer in mixers:
        runs = [score(mixer, data[seed], seed, seconds, steps_cap, patch) for seed in seeds]
        accs = [a for _, a in runs]
        sd = f"{statistics.stdev(accs):.3f}" if len(accs) > 1 else "-"  # one seed: no spread to state
        cells = " | ".join(f"{n} / {a:.3f}" for n, a in runs)
        print(f"| {mixer} | {'2-D' if mixer in TWO_D else '1-D'} | {cells} | {statistics.mean(accs):.3f} | {sd} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", choices=["pathfinder", "digits", "cifar"],
                    help="default: pathfinder digits, and cifar when --cifar is given")
    ap.add_argument("--cifar", type=Path, metavar="DIR", help="a folder with cifar-10-batches-bin/ (the LRA "
                    "image task, grey); nothing is downloaded")
    ap.add_argument("--seconds", type=float, default=15.0, help="wall seconds of training per model and seed")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --seconds (0: time)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="e.g. --seeds 0 1 2: three runs averaged")
    ap.add_argument("--patch", type=int, default=4, choices=[1, 2, 4, 8], help="1: the arena's own cells")
    ap.add_argument("--models", nargs="+", default=[*TWO_D, *ONE_D], choices=[*TWO_D, *ONE_D])
    args = ap.parse_args()
    tasks = args.tasks or ["pathfinder", "digits", *(["cifar"] if args.cifar else [])]
    if "cifar" in tasks and args.cifar is None:
        ap.error("--tasks cifar needs --cifar DIR, a folder holding cifar-10-batches-bin/ (CIFAR-10's binary "
                 "version, which you download yourself)")
    if args.steps < 0 or args.seconds <= 0 or len(set(args.seeds)) != len(args.seeds):
        ap.error("--steps must be >= 0, --seconds > 0 and --seeds distinct")
    if args.cifar is not None:
        try:
            read_cifar10(args.cifar)  # check the files before any training
        except EfformerError as e:
            ap.error(str(e))
    for task in tasks:
        run(task, args.seconds, args.steps, args.seeds, args.patch, args.models, args.cifar)


if __name__ == "__main__":
    main()
