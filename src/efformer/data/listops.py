"""ListOps generator, from "ListOps: A Diagnostic Dataset for Latent Tree Learning" (Nangia & Bowman, 2018)
as configured by "Long Range Arena: A Benchmark for Efficient Transformers" (Tay et al., 2021).

A ListOps example is a random tree of MIN / MAX / MED / SM operators over digits, printed fully
parenthesised; the label is its value (0-9). This module re-implements the LRA generator
(reference §2.1) with a seed: candidate trees are drawn in numbered chunks, each chunk from its own
random stream derived from (seed, chunk), and chunks are consumed in order, so a parallel run writes
exactly the same files as a serial one.
"""

from __future__ import annotations

import numbers
import os
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efformer.errors import ConfigError

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
HEADER = "Source\tTarget"
SPLITS = ("train", "val", "test")
_CHUNK_TRIES = 2000  # candidate trees per chunk: one unit of (parallel) work


@dataclass(frozen=True)
class ListOpsConfig:
    """Generator settings; the defaults are LRA's (accept 500 < length < 2000, depth 10, 96K/2K/2K)."""

    min_len: int = 500  # exclusive lower bound on the token count (operators + ']' + digits)
    max_len: int = 2000  # exclusive upper bound
    max_depth: int = 10
    max_args: int = 10
    op_prob: float = 0.25  # probability that a node above max_depth is an operator
    n_train: int = 96_000
    n_val: int = 2_000
    n_test: int = 2_000
    task: str = "basic"  # file prefix: {task}_{split}.tsv

    def check(self) -> None:
        """Raise ConfigError when these settings cannot produce any accepted tree."""
        for name in ("n_train", "n_val", "n_test", "min_len", "max_len", "max_depth", "max_args"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ConfigError(name, value, "must be an integer")
        if not isinstance(self.op_prob, numbers.Real) or isinstance(self.op_prob, bool):
            raise ConfigError("op_prob", self.op_prob, "must be a number in (0, 1]")
        if self.max_args < 2:
            raise ConfigError("max_args", self.max_args, "an operator needs at least 2 arguments")
        if self.max_depth < 1:
            raise ConfigError("max_depth", self.max_depth, "must be >= 1")
        if not 0 < self.op_prob <= 1:
            raise ConfigError("op_prob", self.op_prob, "must be in (0, 1]")
        if min(self.n_train, self.n_val, self.n_test) < 0:
            raise ConfigError("n", (self.n_train, self.n_val, self.n_test), "split sizes must be >= 0")
        if self.n_train < 1:
            raise ConfigError("n_train", self.n_train, "must be >= 1: a task needs training examples")
        if self.max_len - self.min_len < 2:
            raise ConfigError("min_len/max_len", (self.min_len, self.max_len),
                              "need min_len + 1 < max_len: lengths are accepted strictly between them")
        longest = 1
        for _ in range(self.max_depth - 1):
            longest = 2 + self.max_args * longest
            if longest > self.min_len:  # long enough; a huge max_depth must not loop for ages
                break
        if longest <= self.min_len:
            raise ConfigError(
                "min_len/max_len", (self.min_len, self.max_len),
                f"need min_len < {longest} (the longest tree at depth {self.max_depth}); lower min_len or raise "
                "max_depth",
            )

    @property
    def total(self) -> int:
        """Number of unique examples over all splits."""
        return self.n_train + self.n_val + self.n_test


class _TooLong(Exception):
    """Raised inside sampling once a tree reaches max_len tokens: it will be rejected anyway."""


def _value(op: str, args: list[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(statistics.median(args))
    return sum(args) % 10  # [SM


def sample_tree(rng: random.Random, cfg: ListOpsConfig) -> tuple[str, int, int] | None:
    """One candidate tree -> (source string, value, token length), or None if too long (aborted early)."""
    parts: list[str] = []
    count = [0]

    def node(depth: int) -> int:
        if depth < cfg.max_depth and rng.random() < cfg.op_prob:
            op = OPERATORS[int(rng.random() * len(OPERATORS))]
            k = 2 + int(rng.random() * (cfg.max_args - 1))
            count[0] += 2
            if count[0] >= cfg.max_len:
                raise _TooLong
            # left-nested ((..((OP a1) a2)..) ak) ]) prints k+1 '(' before OP and one ')' after each arg
            parts.append("( " * (k + 1) + op)
            args = []
            for _ in range(k):
                parts.append(" ")
                args.append(node(depth + 1))
                parts.append(" )")
            parts.append(" ] )")
            return _value(op, args)
        count[0] += 1
        if count[0] >= cfg.max_len:
            raise _TooLong
        digit = int(rng.random() * 10)
        parts.append(str(digit))
        return digit

    try:
        value = node(1)
    except _TooLong:
        return None
    return "".join(parts), value, count[0]


def _chunk_rng(seed: int, chunk: int) -> random.Random:
    state = np.random.SeedSequence([seed, chunk]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def sample_chunk(args: tuple[ListOpsConfig, int, int]) -> tuple[list[tuple[str, int, int]], int]:
    """Accepted trees of one chunk (in draw order) and the number of candidates drawn."""
    cfg, seed, chunk = args
    rng = _chunk_rng(seed, chunk)
    out = []
    for _ in range(_CHUNK_TRIES):
        t = sample_tree(rng, cfg)
        if t is not None and t[2] > cfg.min_len:
            out.append(t)
    return out, _CHUNK_TRIES


def _chunks(cfg: ListOpsConfig, seed: int, workers: int) -> Iterator[list[tuple[str, int, int]]]:
    """Chunk results in chunk order, computed serially or by a process pool in waves."""
    if workers <= 1:
        chunk = 0
        while True:
            yield sample_chunk((cfg, seed, chunk))[0]
            chunk += 1
    import multiprocessing as mp

    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers) as pool:
        chunk, wave = 0, 2 * workers
        while True:
            for res, _ in pool.map(sample_chunk, [(cfg, seed, c) for c in range(chunk, chunk + wave)]):
                yield res
            chunk += wave


def generate(cfg: ListOpsConfig, seed: int = 0, workers: int = 1, progress: bool = False) -> list[tuple[str, int]]:
    """cfg.total unique (source, value) rows, identical for a given seed whatever the number of workers."""
    cfg.check()
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("seed", seed, "must be an integer >= 0")
    from tqdm import tqdm

    seen: dict[str, int] = {}
    stalled = 0
    with tqdm(total=cfg.total, unit="ex", desc="listops", disable=not progress) as bar:
        for accepted in _chunks(cfg, seed, workers):
            before = len(seen)
            for src, value, _ in accepted:
                if len(seen) == cfg.total:
                    break
                seen.setdefault(src, value)
            bar.update(len(seen) - before)
            if len(seen) == cfg.total:
                break
            stalled = stalled + 1 if len(seen) == before else 0
            if stalled >= 50:  # 100K candidates and nothing new: these settings cannot reach cfg.total
                raise ConfigError(
                    "n", cfg.total, f"only {len(seen)} unique trees found with lengths in "
                    f"({cfg.min_len}, {cfg.max_len}) and depth {cfg.max_depth}; lower n or widen the bounds",
                )
    return list(seen.items())


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    """Write rows in the released format (header `Source<TAB>Target`), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(HEADER + "\n")
        for src, value in rows:
            f.write(f"{src}\t{value}\n")
    os.replace(tmp, path)


def generate_files(out: str | Path, cfg: ListOpsConfig, seed: int = 0, workers: int = 1,
                   progress: bool = False) -> dict[str, Path]:
    """Generate and write {task}_{train,val,test}.tsv under out; returns split -> path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", str(out), "is a file; give a folder (it is created if missing)")
    rows = generate(cfg, seed=seed, workers=workers, progress=progress)  # fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum([0, cfg.n_train, cfg.n_val, cfg.n_test])
    paths = {}
    for i, split in enumerate(SPLITS):
        paths[split] = out / f"{cfg.task}_{split}.tsv"
        write_tsv(paths[split], rows[bounds[i]:bounds[i + 1]])
    return paths


__all__ = ["CLOSE", "HEADER", "OPERATORS", "ListOpsConfig", "generate", "generate_files", "sample_tree", "write_tsv"]
