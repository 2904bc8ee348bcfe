"""``efformer factorize``: end to end with its before/after table, and bad input refused before anything is written."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcli")
    torch.manual_seed(0)
    efformer.save(efformer.create_model("lm-tiny", d_model=64, n_layers=2, ffn_mult=3.0), root / "m")
    (root / "calib.txt").write_text("To be, or not to be, that is the question. " * 40)
    (root / "held.txt").write_text("Now is the winter of our discontent made glorious summer. " * 20)
    (root / "empty.txt").write_text("")
    return root


@pytest.mark.parametrize("args", [
    ["--method", "svd", "--rank", "8"],
    ["--method", "asvd", "--target", "params=0.5", "--calib", "{root}/calib.txt"],
    ["--method", "dsformer", "--energy", "0.5"],
])
def test_factorize_prints_the_table_and_saves_a_smaller_model(saved, capsys, args):
    out = saved / f"out-{args[1]}"
    args = [a.replace("{root}", str(saved)) for a in args]
    code = main(["factorize", str(saved / "m"), *args, "--n-samples", "4", "--seq-len", "32", "--text",
                 str(saved / "held.txt"), "--window", "32", "--max-windows", "4", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "[ 10/10] backbone.blocks.1.ffn.down" in captured.err
    for row in ("parameters", "FLOPs/token", "latency ms/32 tokens", "perplexity"):
        assert f"| {row}" in captured.out
    model = efformer.load(out)
    assert model.factorization["method"] == args[1]
    before = sum(p.numel() for p in efformer.load(saved / "m").parameters())
    assert sum(p.numel() for p in model.parameters()) < before


@pytest.mark.parametrize("args,message", [
    (["--method", "qr", "--rank", "4"], "--method='qr'"),
    (["--rank", "0"], "--rank=0"),
    (["--rank", "65"], "--rank=65"),
    (["--energy", "1.5"], "--energy=1.5"),
    (["--energy", "0"], "--energy=0.0"),
    (["--target", "params=1.0"], "--target=1.0"),
    (["--target", "params=0"], "--target=0.0"),
    (["--target", "flops=0.5"], "params=F"),
    (["--target", "params=0.0001"], "removing it entirely"),
    ([], "exactly one budget"),
    (["--rank", "4", "--energy", "0.5"], "exactly one budget"),
    (["--method", "asvd", "--rank", "4"], "--calib"),
    (["--method", "asvd", "--rank", "4", "--calib", "{root}/empty.txt"], "empty"),
    (["--method", "asvd", "--rank", "4", "--calib", "{root}/missing.txt"], "does not exist"),
    (["--rank", "4", "--window", "4096"], "max_len"),
])
def test_bad_input_is_one_paragraph_exit_2_and_nothing_written(saved, capsys, args, message):
    out = saved / "never"
    args = [a.replace("{root}", str(saved)) for a in args]
    assert main(["factorize", str(saved / "m"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not any(p.name.startswith(".never") for p in saved.iterdir())


def test_refuses_to_overwrite_its_input(saved, capsys):
    assert main(["factorize", str(saved / "m"), "--rank", "4", "--out", str(saved / "m")]) == 2
    assert "must differ" in capsys.readouterr().err
