"""``efformer quantize`` and ``efformer perplexity``: post-training quantization of a saved byte-level LM."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from efformer.compress.api import make_config, quantize
from efformer.compress.calibration import calibration_windows, read_text_ids
from efformer.compress.evaluate import perplexity
from efformer.compress.factorize_cli import register_factorize
from efformer.compress.prune_cli import register_prune
from efformer.errors import CapabilityError, CheckpointError, ConfigError, DataError
from efformer.models import CausalLM, load, save

METHODS = ("rtn", "gptq", "w8a8", "float")


def register(sub) -> None:
    """Add the ``quantize`` and ``perplexity`` subcommands."""
    q = sub.add_parser("quantize", help="post-training quantization of a saved model (RTN, GPTQ, W8A8, FP8/FP4)")
    q.add_argument("model", help="folder written by efformer.save")
    q.add_argument("--method", default="gptq", help=f"one of {', '.join(METHODS)}")
    q.add_argument("--bits", type=int, default=4, help="bits per weight, 2..8 (rtn, gptq)")
    q.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 = one per row (rtn, gptq)")
    q.add_argument("--symmetric", action="store_true", help="signed codes without zero point (rtn, gptq)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns by decreasing Hessian diagonal (default on)")
    q.add_argument("--mse-clip", action="store_true", help="rtn, gptq: search a clipped range per row/group")
    q.add_argument("--static-groups", action="store_true", help="GPTQ: group grids from the original weights")
    q.add_argument("--smoothing", default="none", help="w8a8: none, smoothquant or osplus")
    q.add_argument("--alpha", type=float, default=0.5, help="w8a8 smoothquant: migration strength")
    q.add_argument("--prob-bits", type=int, default=None,
                   help="w8a8: log2-quantize softmax attention probabilities to this many bits (FQ-ViT)")
    q.add_argument("--format", default="fp8_e4m3", help="float: fp8_e4m3, fp8_e5m2 or fp4_e2m1")
    q.add_argument("--scaling", default="channel", help="float: tensor, channel, mx or nv")
    q.add_argument("--calib", nargs="+", default=None, help="UTF-8 text files for calibration (gptq, smoothing)")
    q.add_argument("--n-samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="folder for the quantized model (new, or a saved model)")
    q.set_defaults(fn=_cmd_quantize)

    p = sub.add_parser("perplexity", help="perplexity of a saved byte-level LM (float or quantized) on text files",
                       description="Windows of --window bytes start every --stride bytes; each scores only the "
                       "bytes no earlier window scored, so every byte after the first is predicted once (stride = "
                       "window: GPTQ's non-overlapping protocol).")
    p.add_argument("model", help="folder written by efformer.save")
    p.add_argument("--text", nargs="+", required=True, help="UTF-8 text files")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=None, help="default: the window (non-overlapping)")
    p.add_argument("--max-windows", type=int, default=None)
    p.set_defaults(fn=_cmd_perplexity)
    register_prune(sub)  # efformer prune (compress/prune_cli.py)
    register_factorize(sub)


def _method_config(args):
    if args.method not in METHODS:
        raise ConfigError("--method", args.method, f"one of {', '.join(METHODS)}")
    opts = {"rtn": dict(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, mse_clip=args.mse_clip),
            "w8a8": dict(smoothing=args.smoothing, alpha=args.alpha, prob_bits=args.prob_bits),
            "float": dict(format=args.format, scaling=args.scaling)}
    opts["gptq"] = {**opts["rtn"], "act_order": args.act_order, "static_groups": args.static_groups}
    try:
        return make_config(args.method, **opts[args.method])
    except ConfigError as e:  # name the flag, not the config field
        raise ConfigError(f"--{e.field.rpartition('.')[2].replace('_', '-')}", e.value, e.allowed) from None


def _load_lm(path: str) -> CausalLM:
    model = load(path)
    if not isinstance(model, CausalLM):
        raise CapabilityError(f"{path} holds a {model.cfg.task!r} model; these commands take a byte-level "
                              "language model (task='lm')")
    return model


def _cmd_quantize(args) -> int:
    config = _method_config(args)
    needs_calib = args.method == "gptq" or (args.method == "w8a8" and config.smoothing != "none")
    if needs_calib and not args.calib:
        raise ConfigError("--calib", None, f"--method {args.method} needs calibration text files (--calib FILES)")
    for flag, v in (("--n-samples", args.n_samples), ("--seq-len", args.seq_len)):
        if v < 1:
            raise ConfigError(flag, v, "must be >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder path")
    if out.resolve() == Path(args.model).resolve():
        raise ConfigError("--out", args.out, "must differ from the input model folder (keep the float model)")
    model = _load_lm(args.model)
    calib = None
    if needs_calib:
        if args.seq_len > model.cfg.max_len:
            raise ConfigError("--seq-len", args.seq_len, f"must be <= the model's max_len {model.cfg.max_len}")
        ids = read_text_ids(args.calib)
        if ids.numel() == 0:
            raise DataError(f"the calibration files {args.calib} are empty; give text files with content")
        calib = calibration_windows(ids, args.seq_len, args.n_samples, args.seed)
    start = time.perf_counter()

    def progress(name, i, total, seconds):
        print(f"[{i + 1:>3}/{total}] {name:<48} {seconds:7.2f}s", file=sys.stderr, flush=True)

    quantize(model, config, calib, progress=progress)
    save(model, out)
    print(f"quantized {len(model.quantization['modules']) or 'all'} linears with {args.method} in "
          f"{time.perf_counter() - start:.1f}s; saved to {out}")
    return 0


def _cmd_perplexity(args) -> int:
    if args.window < 2:
        raise ConfigError("--window", args.window, "must be >= 2")
    model = _load_lm(args.model)
    if args.window > model.cfg.max_len:
        raise ConfigError("--window", args.window, f"must be <= the model's max_len {model.cfg.max_len}")
    ids = read_text_ids(args.text)
    ppl = perplexity(model, ids, args.window, args.stride, max_windows=args.max_windows)
    stride = args.stride or args.window
    print(f"perplexity {ppl:.4f} over {ids.numel()} bytes (window {args.window}, stride {stride})")
    return 0
