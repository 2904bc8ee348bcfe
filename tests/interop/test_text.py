"""BPE training (`efformer tokenizer train`); reading tokenizers is tested in tests/data/test_text.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from efformer.errors import ConfigError, DataError
from efformer.interop.text import FileTokenizer, load_tokenizer, train_bpe

pytest.importorskip("tokenizers")
CORPUS = Path(__file__).parents[2] / "src" / "efformer" / "assets" / "tiny_corpus.txt"
TEXT = "Once upon a time, héllo wörld!"


def test_trained_bpe_round_trips_and_compresses(tmp_path):
    path = train_bpe([CORPUS], 300, tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    assert path == tmp_path / "m" / "tokenizer.json" and isinstance(tok, FileTokenizer)
    assert 256 < tok.vocab_size <= 300
    sample = CORPUS.read_text()[:400]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and tok.decode(tok.encode(TEXT)) == TEXT  # byte-level: any text
    assert len(ids) < len(sample.encode("utf-8"))  # merges learned from the corpus shorten it
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["tokenizer.json"]  # no temporary left


@pytest.mark.parametrize("files, vocab, error", [
    ([CORPUS], 100, ConfigError),
    ([], 300, ConfigError),
    (["missing.txt"], 300, DataError),
])
def test_bad_training_arguments_write_nothing(files, vocab, error, tmp_path):
    with pytest.raises(error):
        train_bpe(files, vocab, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_binary_training_file_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="UTF-8"):
        train_bpe([tmp_path / "x.bin"], 300, tmp_path / "m")
