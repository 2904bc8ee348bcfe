"""2-D image models beside the arena's 1-D mixers on the same images: test accuracy after a fixed CPU budget.

With ``--patch 1`` both kinds are built exactly as ``efformer arena`` builds its cells for a pixel task
(quick preset's Pathfinder spec: width 32, 1 layer, 4 heads, FFN 64): a 1-D mixer reads the image as
1024 pixel tokens (``arena.runner.model_config``: text classifier, learned positions), a 2-D mixer as a
32 x 32 grid of one-pixel patches (``arena.runner.image_model_config``). With ``--patch p`` > 1 (the
default, 4: 64 tokens, so that a busy CPU takes enough steps in the budget) every model is that image
model with p x p patches, the 1-D mixers reading the patch tokens row-major: only the mixer differs.
Tasks: Pathfinder-32 (quick preset's "easy" level, generated offline, 1500 images, 80/10/10 split) and
scikit-learn's digits resized to 32 x 32 (1438 train / 359 test). Every model trains for ``--seconds``
of wall time (batch 32, AdamW 2e-3, one seed), then is scored on the test split. The 1-D mixers are
the LRA paper's best on Pathfinder (Linformer, BigBird; Transformer as the reference) plus S4D, the
state-space family that is strongest there; the 2-D ones are Swin windows, PVT spatial reduction,
neighbourhood attention and PoolFormer pooling.
On a shared machine the step counts vary: compare steps as well as accuracy.

    PYTHONPATH=src python benchmarks/vision_accuracy.py --seconds 20            # patch 4
    PYTHONPATH=src python benchmarks/vision_accuracy.py --seconds 120 --patch 1  # the arena's cells
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vision_resolution import train_for  # noqa: E402  (the same training loop as the digits figure)

from efformer.arena.runner import image_model_config, model_config
from efformer.arena.tasks import build_datasets, get_task
from efformer.data.images import digits, token_images
from efformer.models.factory import create_model

ONE_D = ("softmax", "linformer", "bigbird", "s4d")
TWO_D = {"swin": {"window": 7}, "sra": {"ratio": 4}, "neighborhood": {"kernel": 7}, "pool": {}}


def _images(task: str, seed: int):
    """(train, test) as (images (n, 1, 32, 32) in [0, 1], labels) for pathfinder or digits."""
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


def run(task: str, seconds: float, seed: int, patch: int) -> None:
    (x_tr, y_tr), (x_te, y_te) = _images(task, seed)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    print(f"\n{task}: {len(y_tr)} train / {len(y_te)} test, {seconds:.0f} s each, seed {seed}, "
          f"{(32 // patch) ** 2} tokens of {patch}x{patch} pixels")
    print("| model | kind | steps | test accuracy |\n|---|---|---|---|")
    for mixer in (*TWO_D, *ONE_D):
        torch.manual_seed(seed)
        model, as_grid = _model(mixer, n_classes, patch)
        steps = train_for(model, x_tr, y_tr, 2e-3, seed, seconds, inputs=lambda t, g=as_grid: _inputs(t, g))
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(_inputs(x_te[i:i + 64], as_grid)).argmax(-1) for i in range(0, len(y_te), 64)])
        kind = "2-D" if mixer in TWO_D else "1-D"
        print(f"| {mixer} | {kind} | {steps} | {(pred == y_te).float().mean().item():.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["pathfinder", "digits"], choices=["pathfinder", "digits"])
    ap.add_argument("--seconds", type=float, default=15.0, help="wall seconds of training per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, default=4, choices=[1, 2, 4, 8], help="1: the arena's own cells")
    args = ap.parse_args()
    for task in args.tasks:
        run(task, args.seconds, args.seed, args.patch)


if __name__ == "__main__":
    main()
