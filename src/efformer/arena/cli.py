"""``efformer arena``: run the LRA grid and render the leaderboard."""

from __future__ import annotations

from efformer.arena.leaderboard import render
from efformer.arena.runner import run_grid
from efformer.results import DEFAULT_PATH, ResultsStore


def register(sub) -> None:
    """Add the ``arena`` subcommand."""
    a = sub.add_parser("arena", help="Long Range Arena grid: mixers x tasks x seeds, then the leaderboard")
    a.add_argument("--preset", default="quick", choices=["quick", "paper"])
    a.add_argument("--mixers", nargs="+", default=None,
                   help="'all', or names; default: every registered mixer, except that the quick grid leaves out "
                        "the ones slow on CPU (it prints which)")
    a.add_argument("--tasks", nargs="+", default=None,
                   help="default: listops (quick) or listops and pathfinder (paper), plus text/retrieval/image if "
                        "--data-dir has their files; quick pathfinder is not offered (it ended below chance)")
    a.add_argument("--seeds", type=int, nargs="+", default=[0])
    a.add_argument("--data-dir", default=None, help="folder with the released LRA files (and the generated cache)")
    a.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    a.add_argument("--store", default=str(DEFAULT_PATH))
    a.add_argument("--out", default="runs/arena", help="leaderboard and per-cell run folders")
    a.add_argument("--leaderboard-only", action="store_true", help="render from the store without training")
    a.set_defaults(fn=_cmd_arena)


def _cmd_arena(args) -> int:
    import time


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
