"""The results store: one SQLite file (WAL mode, versioned schema) for runs, metrics, evaluations
and benchmark rows. Safe for several processes appending at once; reports are made from it alone."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from efformer.errors import EfformerError
from efformer.version import VERSION

SCHEMA_VERSION = 1
DEFAULT_PATH = Path(os.environ.get("EFFORMER_RESULTS", "runs/results.db"))

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, config TEXT NOT NULL,
    code_version TEXT, machine TEXT, device TEXT, status TEXT NOT NULL DEFAULT 'running',
    started REAL NOT NULL, finished REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics (run_id, name, step);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL, split TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    step INTEGER, time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bench (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sweep_id TEXT, mixer TEXT NOT NULL, mode TEXT NOT NULL,
    seq_len INTEGER NOT NULL, batch INTEGER NOT NULL, d_model INTEGER, n_heads INTEGER,
    dtype TEXT, device TEXT NOT NULL, causal INTEGER, status TEXT NOT NULL,
    time_ms REAL, peak_mem_mb REAL, flops REAL, gflops REAL, peak_fraction REAL,
    extra TEXT, time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS bench_cell ON bench (device, mixer, mode, seq_len);
"""


class StoreError(EfformerError):
    """The results file cannot be opened or has an unknown schema version."""


def machine_info() -> dict[str, str]:
    """Machine and code identity recorded with each run."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {
        "code_version": f"{VERSION}+{rev}" if rev else VERSION,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
    }


class ResultsStore:
    """A handle on the results SQLite file; every write is one short transaction.

    The file (and its folder) is created by the first write, not by opening the store, so a command
    that fails before it records anything leaves no empty results file behind. An existing file is
    checked at once.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH):
        self.path = Path(path)
        if self.path.exists():
            if not self.path.is_file():
                raise StoreError(f"{self.path} is a folder, not a results database; give the path of a .db file")
            self._ensure()

    def _ensure(self) -> None:
        """Create the file and schema if missing (idempotent) and check the schema version."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create its folder ({e.strerror}); "
                             "pick another results path") from None
        try:
            row = self._create_schema()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable results database ({e})") from None
        if int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {row[0]}, this efformer reads {SCHEMA_VERSION}; "
                "use a new results file or the matching efformer version"
            )
        self._ready = True

    _ready = False

    def _create_schema(self) -> tuple[str]:
        """Make the file WAL and its tables exist, under the write lock; return the schema-version row.

        Several processes may do this at once on a new file. Two things in SQLite fail fast instead
        of waiting on the busy timeout: switching to WAL while another connection holds the file, and
        a deferred transaction that read first and then wants to write. So the switch is retried
        here, and the tables are made inside ``BEGIN IMMEDIATE``, which waits for the lock properly.
        """
        deadline = time.monotonic() + 60
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=60000")
            while True:
                try:
                    con.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            con.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _DDL.split(";")):
                con.execute(statement)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("COMMIT")
            return con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        finally:
            con.close()

    @contextmanager
    def _connect(self):
        if not self._ready or not self.path.exists():
            self._ensure()
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:  # WAL is a property of the file, set once by _create_schema
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    # ---- runs, metrics, evaluations ------------------------------------------------------
    def start_run(self, run_id: str, kind: str, config: dict, name: str | None = None, device: str = "cpu") -> None:
        """Record a run (or mark an existing one running again, on resume)."""
        info = machine_info()
        with self._connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, kind, name, config, code_version, machine, device, status, started) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?) "
                "ON CONFLICT(run_id) DO UPDATE SET status='running'",
                (run_id, kind, name, json.dumps(config, sort_keys=True), info["code_version"], info["machine"],
                 device, time.time()),
            )

    def finish_run(self, run_id: str, status: str = "done") -> None:
        """Mark a run finished with ``status`` (done, failed, diverged, ...)."""
        with self._connect() as con:
            con.execute("UPDATE runs SET status=?, finished=? WHERE run_id=?", (status, time.time(), run_id))

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        """Append metric values of one step."""
        now = time.time()
        with self._connect() as con:
            con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                            [(run_id, step, k, float(v), now) for k, v in values.items()])

    def log_eval(self, run_id: str, split: str, values: dict[str, float], step: int | None = None) -> None:
        """Append evaluation results (e.g. split='test', metric='accuracy')."""
        now = time.time()
        with self._connect() as con:
            con.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?)",
                            [(run_id, split, k, float(v), step, now) for k, v in values.items()])

    def add_bench_rows(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append benchmark rows (dicts with the bench table's columns; unknown keys go to ``extra``)."""
        cols = ["sweep_id", "mixer", "mode", "seq_len", "batch", "d_model", "n_heads", "dtype", "device",
                "causal", "status", "time_ms", "peak_mem_mb", "flops", "gflops", "peak_fraction"]
        vals = []
        for r in rows:
            extra = {k: v for k, v in r.items() if k not in cols}
            vals.append([r.get(c) for c in cols] + [json.dumps(extra, sort_keys=True), time.time()])
        with self._connect() as con:
            con.executemany(f"INSERT INTO bench ({', '.join(cols)}, extra, time) VALUES "
                            f"({', '.join('?' * (len(cols) + 2))})", vals)
        return len(vals)

    # ---- reading -------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only SQL query as dicts (none while the file does not exist yet)."""
        if not self.path.exists():
            return []
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, params).fetchall()]
        finally:
            con.close()

    def runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All runs (optionally of one kind), newest first."""
        if kind is None:
            return self.query("SELECT * FROM runs ORDER BY started DESC")
        return self.query("SELECT * FROM runs WHERE kind=? ORDER BY started DESC", (kind,))

    def metrics(self, run_id: str, name: str | None = None) -> list[dict[str, Any]]:
        """Metric rows of a run in step order."""
        if name is None:
            return self.query("SELECT * FROM metrics WHERE run_id=? ORDER BY step", (run_id,))
        return self.query("SELECT * FROM metrics WHERE run_id=? AND name=? ORDER BY step", (run_id, name))

    def evals(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Evaluation rows (of one run, or all)."""
        if run_id is None:
            return self.query("SELECT * FROM evals ORDER BY time")
        return self.query("SELECT * FROM evals WHERE run_id=? ORDER BY time", (run_id,))

    def bench_rows(self, device: str | None = None) -> list[dict[str, Any]]:
        """Benchmark rows (of one device, or all), oldest first, with their ``extra`` fields merged in."""
        if device is None:
            rows = self.query("SELECT * FROM bench ORDER BY id")
        else:
            rows = self.query("SELECT * FROM bench WHERE device=? ORDER BY id", (device,))
        return [{**json.loads(r.pop("extra") or "{}"), **r} for r in rows]
