"""torchrun: 2-process gloo DDP (and FSDP2) give the loss curve of 1 process with the same global batch;
only rank 0 writes results; every rank resumes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from efformer.results import ResultsStore
from tests.train.conftest import tiny_run_dict


def _torchrun(config, out, results, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "efformer.cli", "train", str(config), "--out", str(out), "--results", str(results), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _curve(store: ResultsStore, run_id: str, name: str = "loss") -> list[float]:
    from efformer.train.report import series

    return [v for _, v in series(store, run_id, name)]


def _single_process_reference(tmp_path, config):
    from efformer.train.cli import run_training
    from efformer.train.config import load_run_config

    run_training(load_run_config(config, [f"out_dir={tmp_path / 'one'}", f"results={tmp_path / 'one.db'}"]))
    store = ResultsStore(tmp_path / "one.db")
    return store, store.runs()[0]["run_id"]


def _run_and_compare(tmp_path, parallel: str, grad_accum: int):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_dict(tmp_path, steps=5, eval_every=2, checkpoint_every=2)))
    one, one_id = _single_process_reference(tmp_path, config)
    done = _torchrun(config, tmp_path / "two", tmp_path / "two.db", "--set", f"train.parallel={parallel}",
                     "--set", f"train.grad_accum={grad_accum}")
    assert done.stdout.count("step 5/5") == 1  # only rank 0 reports progress
    two = ResultsStore(tmp_path / "two.db")
    (run,) = two.runs()  # only rank 0 writes results
    assert run["status"] == "done"
    a, b = _curve(one, one_id), _curve(two, run["run_id"])
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    ea, eb = _curve(one, one_id, "eval_loss"), _curve(two, run["run_id"], "eval_loss")
    assert len(ea) == len(eb) == 3 and max(abs(x - y) for x, y in zip(ea, eb, strict=True)) < 1e-5
    return config, two, run


def test_two_process_ddp_matches_one_process_loss_curve(tmp_path):
    # grad_accum=2 per rank also covers DDP's no_sync path: 2 ranks x 2 micro-batches x 2 = the batch of 8
    _run_and_compare(tmp_path, "ddp", grad_accum=2)


@pytest.mark.slow
def test_two_process_fsdp_matches_and_every_rank_resumes(tmp_path):
    config, store, run = _run_and_compare(tmp_path, "fsdp", grad_accum=1)
    _torchrun(config, tmp_path / "two", tmp_path / "two.db", "--set", "train.parallel=fsdp",
              "--set", "train.steps=7", "--resume")
    assert len(_curve(store, store.runs()[0]["run_id"])) == 7
