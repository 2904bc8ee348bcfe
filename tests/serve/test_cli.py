"""``efformer serve``: bad arguments are one paragraph and exit 2, before anything starts; a real
``efformer serve`` subprocess answers /health and stops on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from efformer.cli import main
from efformer.models import save
from efformer.models.factory import create_model

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("m") / "tiny"
    save(create_model("lm-tiny", d_model=32, n_layers=1, n_heads=4, max_len=64), d)
    return d


@pytest.mark.parametrize(("args", "needle"), [
    (["--port", "70000"], "--port"),
    (["--drain", "-1"], "--drain"),
    (["--kv-window", "0"], "window"),
    (["--kv-window", "8", "--kv-int8"], "int8"),
    (["--kv-window", "8", "--kv-sinks", "-1"], "sinks"),
])
def test_bad_arguments_exit_2(model_dir, capsys, args, needle):
    assert main(["serve", str(model_dir), *args]) == 2
    assert needle in capsys.readouterr().err


def test_missing_model_dir_exits_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "model" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch and uvicorn: ~10 s on a quiet machine, 50 s on a busy one
def test_serve_subprocess_answers_and_stops(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "efformer.cli", "serve", str(model_dir), "--port", str(port),
                             "--drain", "1", "--kv-window", "16"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        ok = False
        for _ in range(300):  # bounded: up to ~30 s for the interpreter and torch to start
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["status"] == "ok"
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert ok, proc.stdout.read1(4000) if proc.poll() is not None else "no answer"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
