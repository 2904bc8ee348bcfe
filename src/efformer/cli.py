"""The ``efformer`` command: list, describe, generate, demo (later: train, arena, bench, advise)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from efformer.errors import EfformerError


def _cmd_list(args) -> int:
    from efformer.registry import FFNS, MIXERS, NORMS, POSITIONALS

    rows = []
    for name in MIXERS.names():
        c = MIXERS.get(name).capabilities
        rows.append([
            name, c.family, "y" if c.causal else "-", "y" if c.bidirectional else "-",
            "y" if c.padding_mask else "-", "y" if c.decode else "-", "exact" if c.exact else "approx",
            c.time, ",".join(c.forms),
        ])
    header = ["mixer", "family", "causal", "bidir", "mask", "decode", "exact", "time", "forms"]
    print(_table(header, rows))
    print()
    for title, reg in (("positional", POSITIONALS), ("norm", NORMS), ("ffn", FFNS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def _cmd_describe(args) -> int:
    from efformer.registry import describe_mixer

    print(json.dumps(describe_mixer(args.name), indent=2))
    return 0


def _cmd_generate(args) -> int:
    from efformer.models import load

    model = load(args.model)
    prompt = list(args.prompt.encode("utf-8"))
    out = model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p)[0]
    print(bytes(t % 256 for t in out).decode("utf-8", errors="replace"))
    return 0


def _cmd_demo(args) -> int:
    from efformer.demo import run_lm_demo

    res = run_lm_demo(mixer=args.mixer, steps=args.steps)
    print(f"loss {res['first_loss']:.3f} -> {res['last_loss']:.3f} in {res['seconds']:.1f}s")
    print("sample:", res["sample"])
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


# Subpackages that add their own subcommands: each module has ``register(subparsers)``.
PLUGIN_MODULES = (
    "efformer.train.cli",  # train, eval, runs, report
    "efformer.data.cli",  # data listops | pathfinder
    "efformer.arena.cli",  # arena
    "efformer.bench.cli",  # bench, advise
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``efformer`` command."""
    p = argparse.ArgumentParser(prog="efformer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered mechanism and its capabilities").set_defaults(fn=_cmd_list)
    d = sub.add_parser("describe", help="capabilities and options of one mixer")
    d.add_argument("name")
    d.set_defaults(fn=_cmd_describe)
    g = sub.add_parser("generate", help="generate text from a saved byte-level LM")
    g.add_argument("model", help="folder written by model.save()")
    g.add_argument("--prompt", default="The ")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.set_defaults(fn=_cmd_generate)
    m = sub.add_parser("demo", help="the built-in demo")
    m.add_argument("--mixer", default="softmax")
    m.add_argument("--steps", type=int, default=300)
    m.set_defaults(fn=_cmd_demo)
    for mod in PLUGIN_MODULES:
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) and importlib.util.find_spec(mod):
            importlib.import_module(mod).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; efformer errors become one clear line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except EfformerError as e:
        print(f"efformer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
