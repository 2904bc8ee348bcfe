"""``efformer factorize``: low-rank (SVD, activation-aware SVD) or dense x sparse (DSFormer) factorization of a
saved byte-level LM, with a before/after table (parameters, FLOPs per token, measured latency, perplexity)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from efformer.bench.cells import count_flops
from efformer.compress.calibration import calibration_windows, read_text_ids
from efformer.compress.evaluate import perplexity
from efformer.compress.lowrank import FactorizeConfig, factorize
from efformer.errors import CapabilityError, CheckpointError, ConfigError, DataError
from efformer.models import CausalLM, load, save

METHODS = ("svd", "asvd", "dsformer")


def register_factorize(sub) -> None:
    """Add the ``factorize`` subcommand."""
    f = sub.add_parser("factorize", help="factorize a saved LM's linears into smaller ones (svd, asvd, dsformer)",
                       description="Replaces every linear but the heads by two smaller ones (svd, asvd: rank-R "
                       "factors; dsformer: a dense basis times a 2:4-sparse mixing matrix). The budget is one of "
                       "--rank, --energy or --target params=F (keep F of the factorized linears' weights).")
    f.add_argument("model", help="folder written by efformer.save")
    f.add_argument("--method", default="svd", help=f"one of {', '.join(METHODS)} (asvd needs --calib)")
    f.add_argument("--rank", type=int, default=None, help="rank (dsformer: inner width, a multiple of 4) per linear")
    f.add_argument("--energy", type=float, default=None, help="keep this fraction of sum s_i^2 per linear, (0, 1]")
    f.add_argument("--target", default=None, help="params=F: keep F in (0, 1) of each factorized linear's weights")
    f.add_argument("--damp", type=float, default=0.01, help="asvd: dampening, a fraction of mean diag(X^T X)")
    f.add_argument("--calib", nargs="+", default=None, help="UTF-8 text files for calibration (asvd)")
    f.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    f.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--text", nargs="+", default=None, help="held-out UTF-8 text files for the perplexity column")
    f.add_argument("--window", type=int, default=256, help="perplexity and latency window")
    f.add_argument("--max-windows", type=int, default=16, help="perplexity: at most this many windows")
    f.add_argument("--out", required=True, help="folder for the factorized model (new, or a saved model)")
    f.set_defaults(fn=_cmd_factorize)


def _config(args) -> FactorizeConfig:
    if args.method not in METHODS:
        raise ConfigError("--method", args.method, f"one of {', '.join(METHODS)}")
    given = [k for k in ("rank", "energy", "target") if getattr(args, k) is not None]
    if len(given) != 1:
        raise ConfigError("--rank/--energy/--target", ", ".join(given) or None, "give exactly one budget: --rank R, "
                          "--energy E or --target params=F")
    opts = {"method": args.method, "damp": args.damp}
    if args.target is not None:
        key, _, value = args.target.partition("=")
        try:
            opts["params"] = float(value)
        except ValueError:
            opts["params"] = None
        if key != "params" or opts["params"] is None:
            raise ConfigError("--target", args.target, "params=F with F a number in (0, 1), e.g. params=0.6")
    else:
        opts[given[0]] = getattr(args, given[0])
    try:
        return FactorizeConfig(**opts)
    except ConfigError as e:
        raise _as_flag(e) from None


def _as_flag(e: ConfigError) -> ConfigError:
    """The same error naming the command-line flag instead of the config field."""
    field = e.field.rpartition(".")[2]
    flags = {"params": "--target", "rank": "--rank", "energy": "--energy", "damp": "--damp", "method": "--method"}
    return ConfigError(flags.get(field, "--rank/--energy/--target"), e.value, e.allowed)


def _stats(model: nn.Module, window: int, ids: torch.Tensor | None, max_windows: int) -> dict[str, float]:
    """Parameters, FLOPs per token, median forward latency per window (ms) and perplexity (or nan)."""
    x = torch.randint(0, model.cfg.vocab_size, (1, window), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        flops = count_flops(lambda: model(x)) / window
        model(x)  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    ppl = perplexity(model, ids, window, max_windows=max_windows) if ids is not None else float("nan")
    return {"params": sum(p.numel() for p in model.parameters()), "flops": flops,
            "ms": 1000 * statistics.median(times), "ppl": ppl}


def _table(before: dict, after: dict, window: int) -> str:
    rows = [("parameters", f"{before['params']:,}", f"{after['params']:,}", after["params"] / before["params"]),
            ("FLOPs/token", f"{before['flops']:,.0f}", f"{after['flops']:,.0f}", after["flops"] / before["flops"]),
            (f"latency ms/{window} tokens", f"{before['ms']:.2f}", f"{after['ms']:.2f}", after["ms"] / before["ms"]),
            ("perplexity", f"{before['ppl']:.3f}", f"{after['ppl']:.3f}", after["ppl"] / before["ppl"])]
    lines = [f"| {'':<24} | {'before':>12} | {'after':>12} | {'ratio':>6} |",
             f"|{'-' * 26}|{'-' * 14}|{'-' * 14}|{'-' * 8}|"]
    lines += [f"| {a:<24} | {b:>12} | {c:>12} | {r:6.3f} |" for a, b, c, r in rows]
    return "\n".join(lines)


def _cmd_factorize(args) -> int:
    config = _config(args)
    if config.method == "asvd" and not args.calib:
        raise ConfigError("--calib", None, "--method asvd needs calibration text files (--calib FILES)")
    for flag, v in (("--n-samples", args.n_samples), ("--seq-len", args.seq_len), ("--window", args.window - 1),
                    ("--max-windows", args.max_windows)):
        if v < 1:
            raise ConfigError(flag, v, "must be >= 1" if flag != "--window" else "must be >= 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder path")
    if out.resolve() == Path(args.model).resolve():
        raise ConfigError("--out", args.out, "must differ from the input model folder (keep the original)")
    model = load(args.model)
    if not isinstance(model, CausalLM):
        raise CapabilityError(f"{args.model} holds a {model.cfg.task!r} model; factorize takes a byte-level "
                              "language model (task='lm')")
    for flag, v in (("--seq-len", args.seq_len), ("--window", args.window)):
        if v > model.cfg.max_len:
            raise ConfigError(flag, v, f"must be <= the model's max_len {model.cfg.max_len}")
    calib = None
    if args.calib:
        ids = read_text_ids(args.calib)
        if ids.numel() == 0:
            raise DataError(f"the calibration files {args.calib} are empty; give text files with content")
        calib = calibration_windows(ids, args.seq_len, args.n_samples, args.seed)
    held_out = read_text_ids(args.text) if args.text else None
    if held_out is not None and held_out.numel() < args.window:
        raise DataError(f"the --text files have {held_out.numel()} bytes, fewer than one window of {args.window}")
    before = _stats(model, args.window, held_out, args.max_windows)
    start = time.perf_counter()

    def progress(name, i, total, seconds):
        print(f"[{i + 1:>3}/{total}] {name:<48} {seconds:7.2f}s", file=sys.stderr, flush=True)

    try:
        factorize(model, config, calib if config.method == "asvd" else None, progress=progress)
    except ConfigError as e:
        raise _as_flag(e) if e.field in ("rank", "energy", "params") else e from None
    after = _stats(model, args.window, held_out, args.max_windows)
    save(model, out)
    sec = model.factorization
    print(f"factorized {len(sec['modules'])} linears with {args.method} ({config.budget}="
          f"{getattr(config, config.budget)}; {len(sec['dense'])} left dense) in {time.perf_counter() - start:.1f}s; "
          f"saved to {out}")
    print(_table(before, after, args.window))
    if held_out is None:
        print("(perplexity: pass --text FILES for held-out text)")
    return 0
