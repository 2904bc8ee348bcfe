"""Text as token ids: a model folder's ``tokenizer.json`` (the ``tokenizers`` library, e.g. a Hugging Face
tokenizer or one from ``efformer tokenizer train``), else raw UTF-8 bytes."""

from __future__ import annotations

import os
from pathlib import Path

from efformer.errors import CheckpointError, ConfigError

TOKENIZER_FILE = "tokenizer.json"


def import_tokenizers():
    """The ``tokenizers`` module, or a ConfigError that says how to install it."""
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
            self.inner = import_tokenizers().Tokenizer.from_file(str(path))
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


def tokenizer_file(path: str | os.PathLike, field: str) -> Path:
    """The ``tokenizer.json`` that ``path`` names: the file itself or the one inside a folder (``field`` names
    the setting in the error)."""
    p = Path(path)
    found = p / TOKENIZER_FILE if p.is_dir() else p
    if not found.is_file():
        raise ConfigError(field, str(path), f"a {TOKENIZER_FILE} file or a folder holding one (e.g. a Hugging Face "
                          "model folder, or the --out of `efformer tokenizer train`)")
    return found
