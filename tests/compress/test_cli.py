"""``efformer quantize`` / ``efformer perplexity``: end to end, and bad input refused before anything is written."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    efformer.save(efformer.create_model("lm-tiny", d_model=64, n_layers=2, ffn_mult=3.0), root / "m")
    (root / "calib.txt").write_text("To be, or not to be, that is the question. " * 40)
    (root / "short.txt").write_text("too short")
    (root / "empty.txt").write_text("")
    return root


def test_quantize_gptq_then_perplexity(saved, capsys):
    out = saved / "q"
    code = main(["quantize", str(saved / "m"), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", str(saved / "calib.txt"), "--n-samples", "4", "--seq-len", "64", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "[  1/10] backbone.blocks.0.mixer.q_proj" in err and err.count("s\n") == 10  # a line per layer, timed
    assert efformer.load(out).quantization["method"] == "gptq"
    assert main(["perplexity", str(out), "--text", str(saved / "calib.txt"), "--window", "64"]) == 0
    assert "window 64, stride 64" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--method", "awq"], "--method='awq'"),
    (["--method", "rtn", "--bits", "9"], "--bits=9"),
    (["--method", "rtn", "--group-size", "48"], "divide the input width 64"),
    (["--method", "float", "--format", "fp6"], "--format='fp6'"),
    (["--method", "gptq"], "--calib"),
    (["--method", "gptq", "--calib", "{root}/empty.txt"], "empty"),
    (["--method", "gptq", "--calib", "{root}/short.txt", "--seq-len", "64"], "fewer than one window"),
    (["--method", "gptq", "--calib", "{root}/missing.txt"], "does not exist"),
])
def test_bad_input_is_one_paragraph_exit_2_and_nothing_written(saved, capsys, args, message):
    out = saved / "never"
    args = [a.replace("{root}", str(saved)) for a in args]
    assert main(["quantize", str(saved / "m"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(".never") for p in saved.iterdir())


def test_perplexity_refuses_short_text(saved, capsys):
    assert main(["perplexity", str(saved / "m"), "--text", str(saved / "short.txt"), "--window", "64"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
