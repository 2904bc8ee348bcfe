"""The ``efformer`` command: list, describe, generate; train, data, arena, bench and advise come from their packages."""

from __future__ import annotations

import argparse
import json
import sys

from efformer.arena import cli as arena_cli
from efformer.bench import cli as bench_cli
from efformer.data import cli as data_cli
from efformer.errors import EfformerError
from efformer.models import load
from efformer.registry import FFNS, MIXERS, NORMS, POSITIONALS, describe_mixer
from efformer.train import cli as train_cli


def _cmd_list(args) -> int:
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
    print(json.dumps(describe_mixer(args.name), indent=2))
    return 0


def _cmd_generate(args) -> int:
    model = load(args.model)
    prompt = list(args.prompt.encode("utf-8"))
    out = model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p)[0]
    print(bytes(t % 256 for t in out).decode("utf-8", errors="replace"))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


# Subpackages that add their own subcommands: each has ``register(subparsers)``.
PLUGINS = (
    train_cli,  # train, eval, runs, report
    data_cli,  # data listops | pathfinder
    arena_cli,  # arena
    bench_cli,  # bench, advise
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
    for plugin in PLUGINS:
        plugin.register(sub)
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
