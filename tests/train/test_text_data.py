"""The trainer's text dataset through a tokenizer.json: ids equal Hugging Face's tokenizer on the same file,
windows decode back to the text, bad settings are refused, and the trained model's folder gets the tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import efformer
from efformer.errors import ConfigError, DataError
from efformer.interop.text import load_tokenizer, train_bpe
from efformer.train.cli import run_training
from efformer.train.config import DataConfig, build_run_config
from efformer.train.data import build_datasets

pytest.importorskip("tokenizers")
CORPUS = Path(__file__).parents[2] / "src" / "efformer" / "assets" / "tiny_corpus.txt"


@pytest.fixture
def files(tmp_path):
    """(text file, tokenizer folder): a byte-level BPE of 300 ids trained on the bundled corpus."""
    text = tmp_path / "text.txt"
    text.write_text(CORPUS.read_text() + "\nhéllo wörld — ünïcode ✓\n", encoding="utf-8")
    train_bpe([CORPUS], 300, tmp_path / "tok")
    return text, tmp_path / "tok"


def _data(text, tokenizer, vocab=300, **options):
    opts = {"path": str(text), "seq_len": 16, "stride": 16, "eval_fraction": 0.2, "tokenizer": str(tokenizer),
            **options}
    return build_datasets(DataConfig(name="text", options=opts), efformer.build_config({"vocab_size": vocab}))


def test_ids_match_hugging_face_and_decode_back(files, tmp_path):
    transformers = pytest.importorskip("transformers")
    text, tok_dir = files
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    hf.save_pretrained(tmp_path / "hf")  # an HF tokenizer folder works as well as our own
    content = text.read_text(encoding="utf-8")
    want = hf(content, add_special_tokens=False)["input_ids"]
    for where in (tok_dir, tmp_path / "hf", tok_dir / "tokenizer.json"):
        train, ev = _data(text, where)
        split = int(len(want) * 0.8)
        got = torch.cat([train[i]["input_ids"] for i in range(len(train))]).tolist()
        assert got == want[: len(got)] and len(got) == split // 16 * 16
        assert ev[0]["input_ids"].tolist() == want[split : split + 16]
    assert len(want) < len(content.encode("utf-8"))  # really BPE ids, not bytes
    assert load_tokenizer(tok_dir).decode(want) == content  # round trip


@pytest.mark.parametrize("change, error, field", [
    ({"vocab": 256}, ConfigError, "model.vocab_size"),
    ({"tokenizer": "missing"}, ConfigError, "data.options.tokenizer"),
])
def test_bad_settings_are_refused(files, change, error, field):
    text, tok_dir = files
    kw = {"vocab": change.get("vocab", 300)}
    with pytest.raises(error, match=field):
        _data(text, change.get("tokenizer", tok_dir), **kw)


def test_bytes_that_are_not_utf8_are_refused_with_a_tokenizer(files, tmp_path):
    _, tok_dir = files
    (tmp_path / "x.bin").write_bytes(b"ok \xff\xfe" * 50)
    with pytest.raises(DataError, match="UTF-8"):
        _data(tmp_path / "x.bin", tok_dir)
    train, _ = build_datasets(DataConfig(name="text", options={"path": str(tmp_path / "x.bin"), "seq_len": 8}),
                              efformer.build_config({"vocab_size": 256}))  # bytes need no UTF-8
    assert train[0]["input_ids"].tolist() == list(b"ok \xff\xfe" * 2)[:8]


def test_training_puts_the_tokenizer_in_the_model_folder(files, tmp_path):
    text, tok_dir = files
    cfg = build_run_config({
        "out_dir": str(tmp_path / "run"), "results": str(tmp_path / "r.db"),
        "model": {"preset": "lm-tiny", "d_model": 32, "n_heads": 2, "n_layers": 1, "vocab_size": 300, "max_len": 64},
        "data": {"name": "text", "options": {"path": str(text), "seq_len": 16, "tokenizer": str(tok_dir)}},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0}})
    run_training(cfg)
    folder = tmp_path / "run" / "model"
    assert (folder / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert efformer.load(folder).cfg.vocab_size == 300
    assert load_tokenizer(folder).decode(load_tokenizer(folder).encode("to be")) == "to be"
