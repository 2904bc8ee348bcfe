"""``efformer prune``: end to end with its before/after table; bad arguments exit 2, one paragraph, nothing written."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-cli")
    torch.manual_seed(0)
    efformer.save(efformer.create_model("lm-tiny", d_model=32, n_layers=2, n_heads=4, ffn_mult=3.0), root / "m")
    (root / "calib.txt").write_text("To be, or not to be, that is the question. " * 20)
    return root


def test_prune_wanda_neurons(saved, capsys):
    out = saved / "p"
    code = main(["prune", str(saved / "m"), "--method", "wanda", "--what", "neurons", "--target", "params=0.8",
                 "--calib", str(saved / "calib.txt"), "--n-samples", "4", "--seq-len", "32", "--max-windows", "4",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "scored 128 neurons with wanda" in captured.err
    for row in ("params", "FLOPs/token", "latency", "perplexity"):
        assert row in captured.out
    m = efformer.load(out)
    hidden = m.cfg.layer_ffn_hidden
    assert hidden[0] == hidden[1] < 64 and "kept params=0.8" in captured.out


def test_prune_blocks_with_fusion(saved, capsys):
    out = saved / "b"
    code = main(["prune", str(saved / "m"), "--method", "block-influence", "--what", "blocks", "--target",
                 "units=0.5", "--calib", str(saved / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
                 "--max-windows", "2", "--fuse", "--fuse-steps", "3", "--out", str(out)])
    assert code == 0 and "fuse step 3/3" in capsys.readouterr().err
    assert efformer.load(out).cfg.n_layers == 1


@pytest.mark.parametrize("args,message", [
    (["--method", "snip", "--what", "neurons", "--target", "params=0.5"], "--method='snip'"),
    (["--method", "magnitude", "--what", "experts", "--target", "params=0.5"], "--what='experts'"),
    (["--method", "magnitude", "--what", "neurons", "--target", "params=1"], "remove nothing"),
    (["--method", "magnitude", "--what", "neurons", "--target", "params=0"], "remove everything"),
    (["--method", "magnitude", "--what", "neurons", "--target", "params=0.05"], "at least"),
    (["--method", "magnitude", "--what", "heads", "--target", "units=0.9"], "nearest plans keep"),
    (["--method", "wanda", "--what", "neurons", "--target", "params=0.5"], "--calib"),
    (["--method", "magnitude", "--what", "neurons", "--target", "params=0.5", "--fuse"], "--fuse"),
    (["--method", "magnitude", "--what", "neurons", "--target", "params=0.5", "--calib", "nope.txt"], "nope.txt"),
    (["--method", "amp", "--what", "heads", "--target", "params=0.5", "--calib", "CALIB"], "amp scores neurons"),
])
def test_bad_arguments_exit_2_and_write_nothing(saved, capsys, args, message):
    out = saved / "never"
    args = [str(saved / "calib.txt") if a == "CALIB" else a for a in args]
    assert main(["prune", str(saved / "m"), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()  # progress lines (if the error comes after scoring), then it
    assert err[-1].startswith("efformer: error: ") and message in err[-1]
    assert sum(line.startswith("efformer:") for line in err) == 1
    assert not out.exists()
