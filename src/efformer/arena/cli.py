"""``efformer arena``: run the LRA grid and render the leaderboard."""

from __future__ import annotations

import time
from pathlib import Path

from efformer.arena.leaderboard import render
from efformer.arena.runner import run_grid
from efformer.arena.tasks import get_task
from efformer.errors import ConfigError
from efformer.registry import MIXERS
from efformer.results import DEFAULT_PATH, ResultsStore


def register(sub) -> None:
    """Add the ``arena`` subcommand."""
    a = sub.add_parser("arena", help="Long Range Arena grid: mixers x tasks x seeds, then the leaderboard")
    a.add_argument("--preset", default="quick", choices=["quick", "paper"])
    a.add_argument("--mixers", nargs="+", default=None,
                   help="'all', or names; default: every sequence mixer under paper, a fixed set of 24 under quick "
                        "(efformer.arena.runner.QUICK_GRID; it prints what it leaves out)")
    a.add_argument("--tasks", nargs="+", default=None,
                   help="default: listops (quick) or listops and pathfinder (paper), plus text/retrieval/image if "
                        "--data-dir has their files; quick pathfinder is not offered (it ended below chance); "
                        "recall tasks (causal LMs): mqar, selective_copy, induction, needle")
    a.add_argument("--seeds", type=int, nargs="+", default=[0])
    a.add_argument("--data-dir", default=None, help="folder with the released LRA files (and the generated cache)")
    a.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    a.add_argument("--store", default=str(DEFAULT_PATH))
    a.add_argument("--out", default="runs/arena", help="leaderboard and per-cell run folders")
    a.add_argument("--leaderboard-only", action="store_true", help="render from the store without training")
    a.set_defaults(fn=_cmd_arena)


def _check_args(args) -> None:
    """Every argument checked before any data, store or folder is made."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError("--out", args.out, "is a file; give a folder for the leaderboard (created if missing)")
    if args.leaderboard_only:
        if not Path(args.store).is_file():
            raise ConfigError("--store", args.store, "no results file there to render; run the grid first "
                              "(drop --leaderboard-only) or give the right --store")
        return
    for m in args.mixers or []:
        MIXERS.get(m)  # unknown names fail with a suggestion
    for t in args.tasks or []:
        get_task(t, args.preset)
    for seed in args.seeds:
        if seed < 0:
            raise ConfigError("--seeds", seed, "seeds must be >= 0")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", args.steps, "must be >= 1 (or leave it out for the preset's steps)")
    if args.data_dir is not None and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise ConfigError("--data-dir", args.data_dir, "is a file; give the folder with the released LRA files")


def _cmd_arena(args) -> int:
    _check_args(args)
    store = ResultsStore(args.store)
    t0 = time.perf_counter()
    if not args.leaderboard_only:
        results = run_grid(args.preset, args.mixers, args.tasks, args.seeds, store, args.out, args.data_dir,
                           args.steps, log=lambda s: print(s, flush=True))
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        print("cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
              + f" in {time.perf_counter() - t0:.0f}s")
    path = render(store, args.preset, args.out)
    print(f"leaderboard: {path} (plot: {path.with_suffix('.png')})")
    return 0
