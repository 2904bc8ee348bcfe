"""Text in and out: a model folder's ``tokenizer.json`` (the ``tokenizers`` library), else raw UTF-8 bytes;
and training a byte-level BPE tokenizer ("Neural Machine Translation of Rare Words with Subword Units",
Sennrich et al.) on the user's files."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from efformer.data.text import TOKENIZER_FILE, ByteTokenizer, FileTokenizer, import_tokenizers, load_tokenizer
from efformer.durable import fsync_dir, fsync_file
from efformer.errors import ConfigError, DataError

__all__ = ["TOKENIZER_FILE", "ByteTokenizer", "FileTokenizer", "load_tokenizer", "train_bpe"]


def train_bpe(files: list[str | os.PathLike], vocab_size: int, out: str | os.PathLike) -> Path:
    """Train a byte-level BPE tokenizer of ``vocab_size`` ids on ``files``; writes ``out/tokenizer.json``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ConfigError("--vocab-size", vocab_size, "an integer >= 257 (the 256 bytes plus merges)")
    paths = [Path(f) for f in files]
    if not paths:
        raise ConfigError("FILES", files, "give at least one text file to train on")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p} is not a file; give text files to train the tokenizer on")
        try:
            with open(p, encoding="utf-8") as f:
                f.read(1 << 16)
        except UnicodeDecodeError as e:
            raise DataError(f"{p} is not UTF-8 text (bad byte at offset {e.start}); give text files") from None
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ConfigError("--out", str(out), "is a file; give a folder (it is created if missing)")
    tk = import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train([str(p) for p in paths], trainer)
    target.mkdir(parents=True, exist_ok=True)
    final = target / TOKENIZER_FILE
    tmp = target / f".{TOKENIZER_FILE}.{secrets.token_hex(6)}.tmp"
    try:  # written beside, then renamed: a reader sees the old file or the whole new one
        tok.save(str(tmp))
        fsync_file(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target)
    return final
