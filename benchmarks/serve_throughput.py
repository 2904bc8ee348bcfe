"""Continuous vs static batching throughput, and a load test of the HTTP server with concurrent clients.

Static batching runs ``model.generate`` on groups of ``--max-batch`` requests, each group lasting
as long as its longest request; the engine (efformer.serve.engine) refills a row as soon as one
finishes. The load test starts ``efformer serve``'s app on 127.0.0.1 (uvicorn in a thread) and has
``--clients`` concurrent httpx clients send requests: tokens/s, p50/p99 latency, peak RSS. Models:
softmax, gated_deltanet and a hybrid of the same size. A script, not a test.

    python benchmarks/serve_throughput.py --requests 32 --clients 1 8
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import threading
import time

import torch

from efformer.models.factory import create_model
from efformer.serve.engine import Engine

MODELS = {
    "softmax": dict(mixer="softmax", positional="rope"),
    "gated_deltanet": dict(mixer="gated_deltanet", positional="none"),
    "hybrid": dict(mixer=["gated_deltanet", "softmax"], positional="none"),
}


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs: prompts of 4..64 tokens, max_tokens skewed in 4..64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(4, 65, (1,), generator=g))
        m = int(4 * 2 ** (torch.rand(1, generator=g) * 4))  # 4 .. 64, log-uniform
        out.append((torch.randint(0, 256, (p,), generator=g).tolist(), m))
    return out


@torch.no_grad()
def batching(model, reqs, max_batch: int) -> tuple[float, float]:
    """(static tokens/s, continuous tokens/s) over the same requests, greedy."""
    total = sum(m for _, m in reqs)
    t0 = time.perf_counter()
    for i in range(0, len(reqs), max_batch):
        group = reqs[i : i + max_batch]
        model.generate([p for p, _ in group], max_new_tokens=max(m for _, m in group))
    static = total / (time.perf_counter() - t0)
    eng = Engine(model, max_batch=max_batch, max_queue=len(reqs))
    t0 = time.perf_counter()
    for p, m in reqs:
        eng.submit(p, {"max_tokens": m})
    while eng.has_work:
        eng.step()
    return static, total / (time.perf_counter() - t0)


def load_test(model, reqs, clients: int, max_batch: int) -> dict[str, float]:
    """Serve ``model`` on a free local port; ``clients`` threads share ``reqs``; returns the figures."""
    import httpx
    import uvicorn

    from efformer.serve.server import build_app

    app = build_app(Engine(model, max_batch=max_batch, max_queue=max(64, clients)), "bench", drain_s=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    latencies, tokens, lock, todo = [], [0], threading.Lock(), list(reqs)

    def client():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt, m = todo.pop()
                t = time.perf_counter()
                r = c.post(url, json={"prompt": prompt, "max_tokens": m, "temperature": 0}).json()
                with lock:
                    latencies.append(time.perf_counter() - t)
                    tokens[0] += r["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    srv.should_exit = True
    th.join(timeout=30)
    sock.close()
    lat = sorted(latencies)
    return {"tok/s": tokens[0] / wall, "p50 s": statistics.median(lat), "p99 s": lat[min(len(lat) - 1,
            int(0.99 * len(lat)))], "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    reqs = workload(args.requests, args.seed)
    print(f"{args.requests} requests, {sum(m for _, m in reqs)} new tokens, max batch {args.max_batch}")
    print(f"{'model':<16}{'static tok/s':>13}{'continuous tok/s':>18}{'ratio':>8}")
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = create_model("lm-tiny", d_model=args.d_model, n_layers=2, n_heads=4, max_len=256,
                                    **MODELS[name]).eval()
        s, c = batching(models[name], reqs, args.max_batch)
        print(f"{name:<16}{s:>13.1f}{c:>18.1f}{c / s:>7.2f}x")
    print(f"\n{'model':<16}{'clients':>8}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}{'peak RSS MB':>13}")
    for name, model in models.items():
        for n in args.clients:
            r = load_test(model, reqs, n, args.max_batch)
            print(f"{name:<16}{n:>8}{r['tok/s']:>9.1f}{r['p50 s']:>8.2f}{r['p99 s']:>8.2f}{r['peak RSS MB']:>13.0f}")


if __name__ == "__main__":
    main()
