"""Run cells in fresh worker processes (one per cell, so no cell's memory pollutes another's),
with a time limit and a memory cap; rows go to the results store as they finish."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from efformer.bench.cells import Cell, run_cell
from efformer.bench.perf import matmul_peak_gflops, reset_peak_rss, rss_kb
from efformer.results import ResultsStore

_CTX = None


def _context():
    """A forkserver context whose server has torch imported once: each cell forks a clean child."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch._dynamo: the FLOP counter imports it on first use (about 2 s); import it once, in the server
        _CTX.set_forkserver_preload(["torch", "torch._dynamo", "efformer.bench.cells", "efformer.mixers", "efformer.nn",
                                     "efformer.bench.model_cells"])
    return _CTX


def run_any(cell: Any, peak: float | None = None) -> dict[str, Any]:
    """A cell's row in this process: its own ``run(peak)`` if it has one (model-level cells), else ``run_cell``."""
    run = getattr(cell, "run", None)
    return run(peak) if callable(run) else run_cell(cell, peak)


def _worker(cell: Any, peak: float | None, mem_cap_gb: float | None, conn) -> None:
    try:
        if mem_cap_gb:
            cap = int(mem_cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import torch

        torch.set_num_threads(int(os.environ.get("EFFORMER_BENCH_THREADS", torch.get_num_threads())))
        base = rss_kb("VmRSS")
        reset_peak_rss()  # so VmHWM measures this cell alone
        if cell.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        row = run_any(cell, peak)
        if cell.device.startswith("cuda"):
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            row["peak_mem_mb"] = max(0, rss_kb("VmHWM") - base) / 1024
        conn.send(row)
    except MemoryError:
        conn.send(cell.key() | {"status": "oom", "error": "MemoryError"})
    except Exception as e:  # a failing cell is a row, not a crash of the sweep
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = "oom" if "allocate memory" in msg or "out of memory" in msg.lower() else "error"
        conn.send(cell.key() | {"status": status, "error": msg, "trace": traceback.format_exc()[-2000:]})
    finally:
        conn.close()


def measure_in_worker(
    cell: Cell | Any, peak: float | None = None, timeout_s: float = 120.0, mem_cap_gb: float | None = None
) -> dict[str, Any]:
    """Run one cell in a fresh process; timeouts and crashes become rows with a status.

    ``cell`` is a :class:`Cell` or any picklable object with ``key()``, ``device`` and ``run(peak)``
    (e.g. the model-level cells of ``efformer.bench.model_cells``).
    """
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_worker, args=(cell, peak, mem_cap_gb, send), daemon=True)
    t0 = time.perf_counter()
    p.start()
    send.close()
    row = None
    if recv.poll(timeout_s):
        try:
            row = recv.recv()
        except EOFError:
            row = None
    p.join(timeout=5)
    if p.is_alive():
        p.kill()
        p.join()
    if row is None:
        if time.perf_counter() - t0 >= timeout_s:
            row = cell.key() | {"status": "timeout", "error": f"exceeded {timeout_s:.0f}s"}
        else:  # killed by the kernel (typically the OOM killer) or crashed hard
            row = cell.key() | {"status": "oom" if p.exitcode == -9 else "error",
                                "error": f"worker exited with code {p.exitcode}"}
    return row


def sweep(
    cells: Iterable[Cell | Any],
    store: ResultsStore | None = None,
    *,
    timeout_s: float = 120.0,
    mem_cap_gb: float | None = None,
    in_process: bool = False,
    progress: bool = True,
) -> tuple[str, list[dict[str, Any]]]:
    """Measure every cell; returns (sweep_id, rows). Rows are stored as they finish."""
    cells = list(cells)
    sweep_id = uuid.uuid4().hex[:12]
    device = cells[0].device if cells else "cpu"
    peak = matmul_peak_gflops(device=device)
    rows = []
    bar = tqdm(cells, desc="bench", disable=not progress, mininterval=1.0)
    for cell in bar:
        bar.set_postfix_str(f"{cell.mixer} {cell.mode} N={cell.seq_len}")
        row = run_any(cell, peak) if in_process else measure_in_worker(cell, peak, timeout_s, mem_cap_gb)
        row.update(sweep_id=sweep_id, matmul_peak_gflops=peak, device=device_name(device))
        rows.append(row)
        if store is not None:
            store.add_bench_rows([row])
    return sweep_id, rows


def device_name(device: str) -> str:
    """A stable name of the device, so stored rows of different machines are not mixed."""
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.machine()}:{os.cpu_count()}cpu"
