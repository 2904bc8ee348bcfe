"""Text in and out: a model folder's ``tokenizer.json`` (the ``tokenizers`` library), else raw UTF-8 bytes;
and training a byte-level BPE tokenizer ("Neural Machine Translation of Rare Words with Subword Units",
Sennrich et al.) on the user's files."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from efformer.durable import fsync_dir, fsync_file
from efformer.errors import CheckpointError, ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("tokenizer", TOKENIZER_FILE, "the `tokenizers` package reads it: pip install "
                          "'efformer[text]' (or remove tokenizer.json to use raw bytes)") from None
    return tokenizers


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: text -> list of ids, ids -> text (ids taken mod 256)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of the bytes ``ids`` (invalid UTF-8 replaced)."""
        return bytes(t % 256 for t in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A ``tokenizer.json`` (any model ``tokenizers`` reads): text -> list of ids, ids -> text."""

    def __init__(self, path: Path):
        try:
            self.inner = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as e:  # the library's parse errors are one Exception type
            raise CheckpointError(f"{path} is not a tokenizer file tokenizers can read ({e}); restore it or delete "
                                  "it to use raw bytes") from None
        self.vocab_size = self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids ``ids``."""
        return self.inner.decode(ids, skip_special_tokens=False)


def load_tokenizer(folder: str | os.PathLike) -> ByteTokenizer | FileTokenizer:
    """The tokenizer of a model folder: its ``tokenizer.json`` when there is one, else bytes."""
    path = Path(folder) / TOKENIZER_FILE
    return FileTokenizer(path) if path.is_file() else ByteTokenizer()


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
    tk = _tokenizers()
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
