"""Reading text as ids: bytes when a folder has no tokenizer.json, the file's tokenizer when it has one."""

from __future__ import annotations

import pytest

from efformer.data.text import ByteTokenizer, load_tokenizer, tokenizer_file
from efformer.errors import CheckpointError, ConfigError

TEXT = "Once upon a time, héllo wörld!"


def test_bytes_without_a_tokenizer_file(tmp_path):
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode(TEXT) == list(TEXT.encode("utf-8")) and tok.decode(tok.encode(TEXT)) == TEXT


def test_corrupt_tokenizer_file(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_file_takes_the_file_or_its_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    path = tmp_path / "tokenizer.json"
    assert tokenizer_file(tmp_path, "x") == tokenizer_file(path, "x") == path
    with pytest.raises(ConfigError, match="data.options.tokenizer"):
        tokenizer_file(tmp_path / "nothing", "data.options.tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="tokenizer.json"):
        tokenizer_file(tmp_path / "empty", "x")
