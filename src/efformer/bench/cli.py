"""``efformer bench`` and ``efformer advise``."""

from __future__ import annotations

from pathlib import Path

import torch

from efformer.bench.advise import advise, arena_accuracy, parse_memory
from efformer.bench.analysis import report
from efformer.bench.cells import Cell
from efformer.bench.peers import peer_status, time_sdpa_peer
from efformer.bench.runner import device_name, sweep
from efformer.errors import ConfigError
from efformer.registry import MIXERS, list_mixers
from efformer.results import DEFAULT_PATH, ResultsStore

DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096]


def register(sub) -> None:
    """Add the ``bench`` and ``advise`` subcommands."""
    b = sub.add_parser("bench", help="speed/memory sweep of mixers on this device")
    b.add_argument("--mixers", nargs="+", default=None, help="default: every registered mixer")
    b.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    b.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd", "prefill", "decode"])
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--d-model", type=int, default=256)
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--timeout", type=float, default=120.0, help="seconds per cell before it is recorded as timeout")
    b.add_argument("--mem-cap-gb", type=float, default=None, help="address-space cap per cell (CPU)")
    b.add_argument("--store", default=str(DEFAULT_PATH))
    b.add_argument("--report", default="runs/bench", help="folder for the markdown report and plots")
    b.add_argument("--report-only", action="store_true", help="render the report from stored rows only")
    b.add_argument("--peers", action="store_true", help="also time raw SDPA (and report optional peers)")
    b.set_defaults(fn=_cmd_bench)

    a = sub.add_parser("advise", help="rank the mixers that fit a length and memory budget here")
    a.add_argument("--seq-len", type=int, required=True)
    a.add_argument("--memory", default="8GB")
    a.add_argument("--causal", action="store_true")
    a.add_argument("--decode", action="store_true")
    a.add_argument("--store", default=str(DEFAULT_PATH))
    a.add_argument("--run-missing", action="store_true", help="bench mixers with no stored rows first")
    a.set_defaults(fn=_cmd_advise)


def _at_least(flag: str, value: float | None, low: float, strict: bool = False) -> None:
    if value is not None and (value <= low if strict else value < low):
        raise ConfigError(flag, value, f"must be {'>' if strict else '>='} {low}")


def check_device(flag: str, device: str) -> str:
    """``device`` if it names a torch device that exists here ('cpu', 'cuda', 'cuda:1'), else a ConfigError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(flag, device, "a torch device such as 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(flag, device, "'cpu' or 'cuda[:N]'; the benchmark runs on these only")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(flag, device, "no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(flag, device, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _existing_store(flag: str, path: str) -> ResultsStore:
    if not Path(path).is_file():
        raise ConfigError(flag, path, "no results file there; run `efformer bench` first or pass the right path")
    return ResultsStore(path)


def _check_bench_args(args) -> None:
    """Every argument checked before anything is measured or written."""
    check_device("--device", args.device)
    if Path(args.report).exists() and not Path(args.report).is_dir():
        raise ConfigError("--report", args.report, "is a file; give a folder for the report (created if missing)")
    if args.report_only:
        return
    for m in args.mixers or []:
        MIXERS.get(m)  # unknown names fail with a suggestion
    for n in args.lengths:
        _at_least("--lengths", n, 1)
    for flag, value in (("--batch", args.batch), ("--d-model", args.d_model), ("--heads", args.heads),
                        ("--repeat", args.repeat)):
        _at_least(flag, value, 1)
    if args.d_model % args.heads:
        raise ConfigError("--heads", args.heads, f"must divide --d-model={args.d_model}")
    _at_least("--timeout", args.timeout, 0, strict=True)
    _at_least("--mem-cap-gb", args.mem_cap_gb, 0, strict=True)


def _cmd_bench(args) -> int:
    _check_bench_args(args)
    store = _existing_store("--store", args.store) if args.report_only else ResultsStore(args.store)
    if not args.report_only:
        mixers = args.mixers or list_mixers()
        cells = [Cell(m, mode, n, batch=args.batch, d_model=args.d_model, n_heads=args.heads, dtype=args.dtype,
                      device=args.device, repeat=args.repeat)
                 for mode in args.modes for n in args.lengths for m in mixers]
        sweep_id, rows = sweep(cells, store, timeout_s=args.timeout, mem_cap_gb=args.mem_cap_gb)
        if args.peers:
            for name, status in peer_status().items():
                print(f"peer {name}: {status}")
            peer_rows = [time_sdpa_peer(n, args.batch, args.d_model, args.heads, mode, False, args.dtype,
                                        args.device, args.repeat) | {"sweep_id": sweep_id,
                                                                     "device": device_name(args.device)}
                         for mode in args.modes for n in args.lengths]
            store.add_bench_rows(peer_rows)
        ok = sum(r["status"] == "ok" for r in rows)
        print(f"sweep {sweep_id}: {ok}/{len(rows)} cells ok, rows in {args.store}")
    rows = store.bench_rows(device_name(args.device))
    path = report(rows, Path(args.report))
    print(f"report: {path}")
    return 0


def _cmd_advise(args) -> int:
    budget = parse_memory(args.memory)
    _at_least("--seq-len", args.seq_len, 1)
    if args.run_missing:
        store = ResultsStore(args.store)
    elif not Path(args.store).is_file():
        raise ConfigError("--store", args.store, "no benchmark results there; run `efformer bench` first, "
                          "pass --run-missing to measure here, or give the right --store")
    else:
        store = ResultsStore(args.store)
    dev = device_name("cpu")
    mode = "decode" if args.decode else "fwdbwd"
    if args.run_missing:
        have = {r["mixer"] for r in store.bench_rows(dev) if r["mode"] == mode and r["status"] == "ok"
                and (not args.causal or r.get("causal") in (1, True))}
        missing = [m for m in list_mixers() if m not in have]
        causal = True if args.causal or args.decode else None
        cells = [Cell(m, mode, n, causal=causal) for m in missing for n in (512, 1024, 2048)]
        cells = [c for c in cells if c.unsupported_reason() is None]
        if cells:
            sweep(cells, store)
    ranked, left_out = advise(store.bench_rows(dev), args.seq_len, budget, causal=args.causal, decode=args.decode,
                              accuracy=arena_accuracy(store))
    print(f"Mixers for N={args.seq_len}, memory {args.memory}, {'causal' if args.causal else 'any direction'}"
          f"{', decoding' if args.decode else ''} on {dev}:")
    if not ranked:
        print("  none fit with the stored measurements")
    for i, a in enumerate(ranked, 1):
        print(f"  {i:>2}. {a.mixer:<18} {a.reason}")
    if left_out:
        print("Left out:")
        for line in left_out:
            print(f"  - {line}")
    return 0
