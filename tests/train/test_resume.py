"""Crash safety: a training process killed with SIGKILL at a random step and resumed with --resume
ends with weights bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from tests.train.conftest import tiny_run_dict


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(config, *extra):
    return [sys.executable, "-m", "efformer.cli", "train", str(config), *extra]


def test_cli_refuses_to_overwrite_and_resume_continues(tmp_path, capsys):
    """``efformer train`` refuses a folder that holds checkpoints; ``--resume`` picks up the latest."""
    from efformer.cli import main

    raw = tiny_run_dict(tmp_path, steps=4, checkpoint_every=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(config), "--resume", "--set", "train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "step 6/6" in out
    final = json.loads(out[out.index("{"):])
    # efformer eval on the run folder evaluates its latest checkpoint on the run's eval data
    assert main(["eval", raw["out_dir"], "--results", raw["results"], "--run-id", "ev"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert main(["eval", str(tmp_path / "run" / "model")]) == 2  # a bare model folder needs --config
    assert "--config" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run" / "model"), "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)


def _kill_resume_compare(tmp_path, steps: int, kill_at: int):
    raw = tiny_run_dict(tmp_path, steps=steps, checkpoint_every=4, keep_last=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"

    # the uninterrupted reference and the resumed run run in this process (the same code path as the
    # CLI, one thread as in the child); only the run that gets killed needs its own process
    import torch

    from efformer.train.cli import run_training
    from efformer.train.config import load_run_config

    proc = subprocess.Popen(_train_cmd(config, "--out", str(crash_dir)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(load_run_config(config, [f"out_dir={ref_dir}"]))
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"step {kill_at}/"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "".join(seen)
        assert not (crash_dir / "model").exists()  # it really died before the end
        resumed = load_run_config(config, [f"out_dir={crash_dir}"])
        if kill_at >= 5:  # the step-4 checkpoint was written before the line of step 5
            from efformer.train.checkpoint import list_checkpoints

            assert list_checkpoints(crash_dir / "checkpoints")
        run_training(resumed, resume=True)
    finally:
        torch.set_num_threads(threads)
    ref = load_file(str(ref_dir / "model" / "model.safetensors"))
    got = load_file(str(crash_dir / "model" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after kill at step {kill_at} and resume"


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    kill_at = random.Random().randint(5, 22)  # a fresh random step each run; shown in the failure message
    _kill_resume_compare(tmp_path, steps=30, kill_at=kill_at)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [1, 4, 5, 37, 79])
def test_sigkill_at_many_steps_then_resume_is_bit_identical(tmp_path, kill_at):
    _kill_resume_compare(tmp_path, steps=80, kill_at=kill_at)
