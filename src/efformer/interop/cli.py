"""`efformer tokenizer train FILES --vocab-size N --out DIR`: a byte-level BPE tokenizer for a model folder;
`efformer distill MODEL_DIR --mixer M --text FILES --steps N --out DIR`: convert and distil a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from efformer.data.text import TOKENIZER_FILE
from efformer.errors import ConfigError
from efformer.interop.distill import distill
from efformer.interop.hf import from_pretrained
from efformer.interop.text import train_bpe
from efformer.train.config import parse_override


def _train(args) -> int:
    path = train_bpe(args.files, args.vocab_size, args.out)
    print(f"wrote {path}")
    return 0


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError("--layers", text, "comma-separated layer indices, e.g. --layers 0,2,3") from None


def _distill(args) -> int:
    layers = _layers(args.layers)
    options = {}
    for text in args.option or []:
        path, value = parse_override(text)
        if len(path) != 1:
            raise ConfigError("--option", text, "KEY=VALUE with a plain option name of the mixer, e.g. --option "
                              "chunk_size=32")
        options[path[0]] = value
    teacher = from_pretrained(args.model)  # an unreadable folder fails here, before anything is written
    tokenizer = args.model if (Path(args.model) / TOKENIZER_FILE).is_file() else None
    train = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    out = distill(teacher, args.text, args.mixer, steps=args.steps, out_dir=args.out, tokenizer=tokenizer,
                  train=train, resume=args.resume, progress_stream=sys.stdout, layers=layers, options=options,
                  train_all=args.train_all, temperature=args.temperature, hidden_weight=args.hidden_weight,
                  seq_len=args.seq_len)
    print(json.dumps({"model": str(Path(args.out) / "model"), "layers": out.conversion.layers, **out.metrics},
                     indent=2))
    return 0


def register(subparsers) -> None:
    """Add the `tokenizer` command with its `train` subcommand, and `distill`."""
    tok = subparsers.add_parser("tokenizer", help="train a BPE tokenizer (tokenizer.json) on your text")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="byte-level BPE on text files; put the result in a model folder")
    t.add_argument("files", nargs="+", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary (>= 257)")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into (created if missing)")
    t.set_defaults(fn=_train)
    d = subparsers.add_parser("distill", help="convert a model's attention to another mixer and distil it from "
                              "the original on your text (KL on next-token distributions)")
    d.add_argument("model", help="efformer or Hugging Face model folder (the teacher; its tokenizer.json is used)")
    d.add_argument("--mixer", required=True, help="mixer the converted layers use, e.g. gated_deltanet, simple_gla")
    d.add_argument("--text", nargs="+", required=True, help="UTF-8 text files to distil on (the tail is held out)")
    d.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    d.add_argument("--out", required=True, help="run folder: checkpoints/ and the student folder model/")
    d.add_argument("--layers", default=None, help="comma-separated layers to convert (default: all)")
    d.add_argument("--option", action="append", metavar="KEY=VALUE", help="an option of the new mixer (repeatable)")
    d.add_argument("--train-all", action="store_true", help="train every parameter, not only the converted mixers")
    d.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the per-layer mixer-output MSE")
    d.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL term")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    d.add_argument("--batch-size", type=int, default=None, help="windows per step (default 8)")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3, cosine)")
    d.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    d.set_defaults(fn=_distill)
