"""`efformer tokenizer train` and `efformer generate` with a folder's tokenizer (efformer or HF folder)."""

from __future__ import annotations

import efformer
from efformer.cli import main
from efformer.interop import to_hf
from efformer.interop.text import load_tokenizer
from tests.interop.test_text import CORPUS


def test_train_then_generate_with_the_tokenizer(tmp_path, capsys):
    assert main(["tokenizer", "train", str(CORPUS), "--vocab-size", "300", "--out", str(tmp_path / "hf")]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    model = efformer.create_model("lm-tiny", vocab_size=300, d_model=32, n_heads=4)
    to_hf(model, tmp_path / "export")  # an HF folder; put the tokenizer beside its weights
    (tmp_path / "export" / "tokenizer.json").write_bytes((tmp_path / "hf" / "tokenizer.json").read_bytes())
    assert main(["generate", str(tmp_path / "export"), "--prompt", "Once upon", "--max-new-tokens", "5"]) == 0
    tok = load_tokenizer(tmp_path / "export")
    ids = tok.encode("Once upon")
    expected = tok.decode(efformer.from_pretrained(tmp_path / "export").generate([ids], 5)[0])
    assert capsys.readouterr().out == expected + "\n"


def test_bad_vocab_size_is_one_paragraph(tmp_path, capsys):
    assert main(["tokenizer", "train", str(CORPUS), "--vocab-size", "10", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efformer: error: --vocab-size=10") and err.count("\n") == 1
    assert not (tmp_path / "t").exists()
