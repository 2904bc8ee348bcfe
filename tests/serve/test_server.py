"""A real server on 127.0.0.1 (random free port, uvicorn in a thread), real HTTP with httpx: completions
streaming and not, models, health, metrics, bad requests as 4xx JSON naming the field, a client that
disconnects mid-stream, and the server serving on after each; always stopped."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from efformer.models.factory import create_model  # noqa: E402
from efformer.serve.engine import Engine  # noqa: E402
from efformer.serve.server import build_app  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("lm-tiny", mixer=["softmax", "gated_deltanet"], positional="none", d_model=32, n_layers=2,
                        n_heads=4, vocab_size=256, max_len=128).eval()


@pytest.fixture(scope="module")
def server(model):
    """(base url, engine); the server is stopped and its thread joined at the end."""
    engine = Engine(model, max_batch=4, max_queue=8, block_size=8)
    app = build_app(engine, "tiny", drain_s=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for startup
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
        sock.close()
        assert not thread.is_alive()
        assert not app.state.engine_loop.thread.is_alive()  # graceful shutdown stopped the engine thread


def greedy_text(model, prompt: str, n: int) -> str:
    ids = list(prompt.encode())
    out = model.generate([ids], max_new_tokens=n)[0][len(ids):]
    return bytes(out).decode("utf-8", errors="replace")


def test_completion_health_models_metrics(server, model):
    url, engine = server
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 7, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == greedy_text(model, "Hello", 7)
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 7
        r = c.post("/v1/completions", json={"prompt": [72, 105], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2
        metrics = c.get("/metrics").text
        assert "efformer_generated_tokens_total" in metrics and "efformer_kv_blocks_free" in metrics


def test_streaming_equals_non_streaming(server, model):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions",
                      json={"prompt": "abc", "max_tokens": 9, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == greedy_text(model, "abc", 9)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"content": b'{"prompt": "hi", "max_tokens": ', "headers": {"content-type": "application/json"}}, 400, "body"),
    ({"json": {"prompt": "hi", "max_tokens": 2, "best_of": 3}}, 400, "best_of"),
    ({"json": {"prompt": "hi", "max_tokens": -1}}, 400, "max_tokens"),
    ({"json": {"prompt": "x" * 200, "max_tokens": 2}}, 400, "prompt"),  # over max_len=128
    ({"json": {"prompt": "hi", "max_tokens": 127}}, 400, "max_tokens"),  # prompt + max_tokens > max_len
    ({"json": {"prompt": ""}}, 400, "prompt"),
    ({"json": {"prompt": [1, 999]}}, 400, "prompt"),  # token id outside the vocabulary
    ({"json": {"prompt": "hi", "temperature": -1}}, 400, "temperature"),
    ({"json": {"prompt": "hi", "model": "other"}}, 404, "model"),
    ({"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}}, 413, "body"),
])
def test_bad_requests_are_4xx_json_naming_the_field(server, kwargs, status, param):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", **kwargs)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"]
        assert c.get("/health").status_code == 200  # still serving


def metric(client, name: str) -> float:
    line = next(ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


def test_disconnect_mid_stream_frees_the_slot(server, model, monkeypatch):
    url, engine = server
    step = engine.step

    def slow_step():  # 120 steps take >= 2.4 s, so the hang-up surely comes before the end
        time.sleep(0.02)
        step()

    monkeypatch.setattr(engine, "step", slow_step)
    with httpx.Client(base_url=url, timeout=30) as c:
        before = metric(c, "efformer_requests_disconnected_total")
        with c.stream("POST", "/v1/completions",
                      json={"prompt": "long", "max_tokens": 120, "temperature": 0, "stream": True}) as r:
            for ln in r.iter_lines():  # read one event, then hang up
                if ln.startswith("data: "):
                    break
        for _ in range(200):  # bounded: the engine notices the cancel within a few steps
            if not engine.has_work:
                break
            time.sleep(0.05)
        assert not engine.has_work and engine.pool.free == engine.pool.num_blocks
        assert metric(c, "efformer_requests_disconnected_total") == before + 1
        r = c.post("/v1/completions", json={"prompt": "again", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text(model, "again", 4)


def test_concurrent_requests_are_batched(server, model):
    url, _ = server
    prompts = ["a", "bcd", "efghij", "k", "lmno", "pq"]
    results = {}

    def go(p):
        with httpx.Client(base_url=url, timeout=60) as c:
            results[p] = c.post("/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0}).json()

    threads = [threading.Thread(target=go, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for p in prompts:
        assert results[p]["choices"][0]["text"] == greedy_text(model, p, 6)
