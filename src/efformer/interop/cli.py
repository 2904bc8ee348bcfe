"""`efformer tokenizer train FILES --vocab-size N --out DIR`: a byte-level BPE tokenizer for a model folder."""

from __future__ import annotations

from efformer.interop.text import train_bpe


def _train(args) -> int:
    path = train_bpe(args.files, args.vocab_size, args.out)
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """Add the `tokenizer` command with its `train` subcommand."""
    tok = subparsers.add_parser("tokenizer", help="train a BPE tokenizer (tokenizer.json) on your text")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="byte-level BPE on text files; put the result in a model folder")
    t.add_argument("files", nargs="+", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary (>= 257)")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into (created if missing)")
    t.set_defaults(fn=_train)
