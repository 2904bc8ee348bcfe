"""`efformer data listops | pathfinder`: generate the synthetic LRA tasks into a folder."""

from __future__ import annotations

import os
from pathlib import Path

from efformer.data import listops, pathfinder
from efformer.errors import ConfigError


def _check(args, flags: dict[str, int]) -> None:
    """Counts at least 1, a non-negative seed and an output path that is not a file, before anything is written."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise ConfigError(flag, value, "must be >= 1")
    if args.seed < 0:
        raise ConfigError("--seed", args.seed, "must be >= 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError("--out", args.out, "is a file; give a folder (it is created if missing)")


def _listops(args) -> int:
    _check(args, {"--n": args.n, "--n-eval": args.n_eval, "--workers": args.workers, "--depth": args.depth})
    n_eval = args.n_eval if args.n_eval is not None else max(1, args.n // 48)  # LRA: 96K / 2K / 2K
    cfg = listops.ListOpsConfig(min_len=args.min_len, max_len=args.max_len, max_depth=args.depth,
                                max_args=args.max_args, n_train=args.n, n_val=n_eval, n_test=n_eval)
    paths = listops.generate_files(args.out, cfg, seed=args.seed, workers=args.workers, progress=True)
    for split, p in paths.items():
        print(f"{split}: {p}")
    return 0


def _pathfinder(args) -> int:
    _check(args, {"--n": args.n, "--batch-size": args.batch_size, "--workers": args.workers})
    root = pathfinder.generate_files(args.out, args.resolution, args.difficulty, n=args.n, seed=args.seed,
                          workers=args.workers, batch_size=args.batch_size, progress=True)
    print(f"wrote {args.n} images under {root}")
    return 0


def register(subparsers) -> None:
    """Add the `data` command with its `listops` and `pathfinder` subcommands."""
    data = subparsers.add_parser("data", help="generate the synthetic Long Range Arena tasks")
    sub = data.add_subparsers(dest="data_command", required=True)
    cpus = max(1, (os.cpu_count() or 1))
    lo = sub.add_parser("listops", help="ListOps TSVs ({train,val,test}) in the released format")
    lo.add_argument("--out", required=True, help="output folder")
    lo.add_argument("--n", type=int, default=96_000, help="training examples (LRA: 96000)")
    lo.add_argument("--n-eval", type=int, default=None, help="val and test examples each (default n/48: 2000)")
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--min-len", type=int, default=500, help="accept lengths strictly above this")
    lo.add_argument("--max-len", type=int, default=2000, help="accept lengths strictly below this")
    lo.add_argument("--depth", type=int, default=10, help="maximum tree depth")
    lo.add_argument("--max-args", type=int, default=10, help="maximum operator arguments")
    lo.add_argument("--workers", type=int, default=cpus, help="processes (output does not depend on it)")
    lo.set_defaults(fn=_listops)
    pfp = sub.add_parser("pathfinder", help="Pathfinder PNGs + metadata in the released layout")
    pfp.add_argument("--out", required=True, help="output folder (gets pathfinder{R}/<level>/)")
    pfp.add_argument("--resolution", type=int, default=32, choices=(32, 64, 128, 256))
    pfp.add_argument("--difficulty", default="hard", choices=("easy", "intermediate", "hard"))
    pfp.add_argument("--n", type=int, default=1000, help="images (LRA: 200000 per level)")
    pfp.add_argument("--seed", type=int, default=0)
    pfp.add_argument("--batch-size", type=int, default=1000, help="images per imgs/<batch>/ folder")
    pfp.add_argument("--workers", type=int, default=cpus, help="processes (output does not depend on it)")
    pfp.set_defaults(fn=_pathfinder)
