"""The ``efformer`` command: list, describe, generate; train, data, arena, bench and advise come from their packages.

Bad input never ends in a traceback: an efformer error is printed as one paragraph
(``efformer: error: ...``) and the command exits with code 2; ``efformer --debug CMD`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import traceback
from typing import Any

from efformer.arena import cli as arena_cli
from efformer.bench import cli as bench_cli
from efformer.compress import cli as compress_cli
from efformer.data import cli as data_cli
from efformer.errors import CapabilityError, ConfigError, EfformerError
from efformer.interop import cli as interop_cli
from efformer.interop import from_pretrained
from efformer.interop.text import load_tokenizer
from efformer.models import CausalLM
from efformer.registry import FFNS, MIXERS, NORMS, POSITIONALS, describe_mixer
from efformer.serve import cli as serve_cli
from efformer.train import cli as train_cli

LIST_WIDTH = 100  # `efformer list` fits a terminal this wide; --wide shows every column in full
EXIT_USAGE = 2  # bad input (argparse uses the same code for its usage errors)
EXIT_INTERNAL = 1  # an unexpected exception: a bug in efformer, not in the input
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def _yes(flag: bool) -> str:
    return "y" if flag else "-"


def _mixer_rows() -> list[dict[str, Any]]:
    return [{"name": name, **MIXERS.get(name).capabilities.as_dict()} for name in MIXERS.names()]


def _cmd_list(args) -> int:
    others = {"positional": POSITIONALS.names(), "norm": NORMS.names(), "ffn": FFNS.names()}
    if args.json:
        print(json.dumps({"mixers": _mixer_rows(), **others}, indent=2))
        return 0
    header = ["mixer", "family", "causal", "bidir", "mask", "decode", "exact", "rope", "bias", "time"]
    rows = []
    for c in _mixer_rows():
        rows.append([c["name"], c["family"], _yes(c["causal"]), _yes(c["bidirectional"]), _yes(c["padding_mask"]),
                     _yes(c["decode"]), _yes(c["exact"]), _yes(c["rotary"]), _yes(c["attention_bias"]), c["time"]])
        if args.wide:
            rows[-1] += [c["memory"], ",".join(c["forms"])]
    if args.wide:
        header += ["memory", "forms"]
        print(_table(header, rows))
    else:  # the time column gets what is left of LIST_WIDTH
        fixed = _table(header[:-1], [r[:-1] for r in rows]).splitlines()[0]
        room = max(len("time"), LIST_WIDTH - len(fixed) - 2)
        print(_table(header, [r[:-1] + [_clip(r[-1], room)] for r in rows]))
    if not args.wide:
        print("rope: takes a rotary transform of q and k; bias: takes an additive score bias (ALiBi, T5, FIRE).")
        print("`efformer list --wide` shows every column in full; `efformer list --json` prints it all as JSON.")
    print()
    for title, names in others.items():
        print(textwrap.fill(f"{title}: {', '.join(names)}", LIST_WIDTH, subsequent_indent="  "))
    return 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def _cmd_describe(args) -> int:
    info = describe_mixer(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.name}: {info['doc']}")
    print(f"paper: {info['paper']}")
    print(f"family: {info['family']}; exact softmax: {_yes(info['exact'])}; time {info['time']}; "
          f"memory {info['memory']}")
    flags = [k for k in ("causal", "bidirectional", "padding_mask", "decode", "rotary", "attention_bias") if info[k]]
    print(f"supports: {', '.join(flags) or 'none'}")
    print(f"forms: {', '.join(info['forms'])}")
    print()
    rows = [[opt, o["type"], repr(o["default"]), o["description"]] for opt, o in info["options"].items()]
    print(_table(["option", "type", "default", "description"], rows))
    return 0


def _cmd_generate(args) -> int:
    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "must be >= 0")
    if not args.prompt:
        raise ConfigError("--prompt", args.prompt, "give at least one character to continue from")
    model = from_pretrained(args.model)  # an efformer folder or a Hugging Face one
    if not isinstance(model, CausalLM):
        raise CapabilityError(f"{args.model} holds a {model.cfg.task!r} model ({type(model).__name__}); "
                              "only a language model (task='lm') can generate text")
    tokenizer = load_tokenizer(args.model)  # the folder's tokenizer.json, else UTF-8 bytes
    out = model.generate([tokenizer.encode(args.prompt)], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)[0]
    print(tokenizer.decode(out))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one paragraph (exit code 2), like efformer's own errors."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# Subpackages that add their own subcommands: each has ``register(subparsers)``.
PLUGINS = (
    train_cli,  # train, eval, runs, report
    data_cli,  # data listops | pathfinder
    arena_cli,  # arena
    bench_cli,  # bench, advise
    compress_cli,  # quantize, perplexity
    serve_cli,  # serve
    interop_cli,  # tokenizer train, distill
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``efformer`` command."""
    p = ArgumentParser(prog="efformer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every registered mechanism and its capabilities")
    ls.add_argument("--wide", action="store_true", help="every column in full (wider than 100 columns)")
    ls.add_argument("--json", action="store_true", help="machine-readable JSON")
    ls.set_defaults(fn=_cmd_list)
    d = sub.add_parser("describe", help="capabilities and options of one mixer")
    d.add_argument("name")
    d.add_argument("--json", action="store_true", help="machine-readable JSON")
    d.set_defaults(fn=_cmd_describe)
    g = sub.add_parser("generate", help="generate text from a saved LM (its tokenizer.json, else bytes)")
    g.add_argument("model", help="folder written by efformer.save / save_pretrained, or a Hugging Face folder")
    g.add_argument("--prompt", default="The ")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.set_defaults(fn=_cmd_generate)
    for plugin in PLUGINS:
        plugin.register(sub)
    return p


def one_paragraph(text: str) -> str:
    """The text with its line breaks folded into spaces: an error message is one paragraph."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on a closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code: 0 done, 2 bad input (one paragraph on stderr), 1 an efformer bug."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0) end here, without a traceback
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # `efformer list | head -1`: the reader has what it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except EfformerError as e:
        if args.debug:
            traceback.print_exc()
        print(f"efformer: error: {one_paragraph(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("efformer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so in one paragraph; --debug has the traceback
        if args.debug:
            raise
        print(f"efformer: internal error: {type(e).__name__}: {one_paragraph(e)} (this is a bug in efformer, "
              "not in the input; rerun with `efformer --debug ...` for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
