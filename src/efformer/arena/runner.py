"""Run an LRA grid (mixers x tasks x seeds) with the trainer; every cell is a row in the results store.

A cell's run id is deterministic (``arena-<preset>-<task>-<mixer>-s<seed>``), so a grid interrupted
by a crash is resumed by running it again: cells with a stored test accuracy are skipped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efformer.arena.tasks import TaskSpec, build_datasets, get_task
from efformer.bench.perf import reset_peak_rss, rss_kb
from efformer.bench.runner import measure_in_worker
from efformer.data.images import token_images
from efformer.data.recall import IGNORE, first_asked
from efformer.errors import CapabilityError, ConfigError, DataError, EfformerError
from efformer.models import create_model
from efformer.models.config import build_config
from efformer.models.vision import build_vision_config
from efformer.registry import MIXERS
from efformer.results import ResultsStore
from efformer.train.config import TrainConfig
from efformer.train.data import collate
from efformer.train.trainer import Trainer

# The default grid's synthetic tasks. Quick Pathfinder (1024 tokens) takes minutes per mixer on 2 CPU
# cores and ended below chance (46%, chance 50%) in that budget, so it is not offered under `quick`.
SYNTHETIC_DEFAULT = {"quick": ("listops",), "paper": ("listops", "pathfinder")}
NOT_OFFERED = {("quick", "pathfinder"): "quick Pathfinder ended below chance (46% vs 50%) in its CPU budget; "
                                        "run it with --preset paper (GPU-sized)"}

# The default quick grid (what `make demo` runs): a fixed set, not "every mixer", so the demo does not
# grow with each new mechanism. The LRA paper's Table 1 models that run in its CPU budget, and one or
# more per later family. Left out: the others (run them with --mixers NAME or --mixers all), among them
# those whose quick cell costs 3-7x a softmax cell on CPU (CPU ms per training step, batch 32, 65 tokens,
# 1 thread: softmax ~62, nystromformer ~450, performer ~210; kernel_rpe ~9x, vim two Mamba scans).
QUICK_GRID = (
    "softmax", "local", "sparse_transformer", "longformer", "linformer", "reformer", "sinkhorn",
    "synthesizer_dense", "synthesizer_random", "bigbird", "linear", "cosformer", "aaren", "sliding_window",
    "dilated_window", "retnet", "simple_gla", "gla", "deltanet", "gated_deltanet", "s4d", "h3", "mamba",
    "mamba2",
)


def sequence_mixers() -> list[str]:
    """Mixers of 1-D sequences: the arena's tasks are token sequences (2-D mixers need an image model)."""
    return [m for m in MIXERS.names() if not MIXERS.get(m).capabilities.grid]


def default_mixers(preset: str) -> tuple[list[str], list[str]]:
    """(mixers of the default grid, mixers left out of it) for ``preset``."""
    names = sequence_mixers()
    if preset != "quick":
        return names, []
    return [m for m in names if m in QUICK_GRID], [m for m in names if m not in QUICK_GRID]


def chance_accuracy(data) -> float:
    """Majority-class accuracy of a labelled dataset: what always predicting its commonest label scores
    (for per-position targets, the commonest asked target)."""
    if hasattr(data, "targets"):
        asked = data.targets[data.targets != IGNORE]
        return float(asked.bincount().max()) / max(1, asked.numel())
    counts: dict[int, int] = {}
    for i in range(len(data)):
        label = int(data[i]["label"])
        counts[label] = counts.get(label, 0) + 1
    return max(counts.values()) / max(1, len(data))


@torch.no_grad()
def first_query_accuracy(model, data, batch_size: int = 256) -> float:
    """Accuracy of a recall LM at each example's first asked position (guessing by elimination cannot help)."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(data), batch_size):
        batch = collate(data[i : i + batch_size])
        pred = model(batch["input_ids"].to(device), mask=batch["mask"].to(device)).argmax(-1).cpu()
        hits += int(((pred == batch["targets"]) & first_asked(batch["targets"])).sum())
    return hits / max(1, len(data))


class CellProgress:
    """The Trainer's ``on_step`` callback for one cell: prints a line at most every ``every_s`` seconds (and at
    the last step) with the cell's name, loss, steps/s and ETA, so a long cell is never silent."""

    def __init__(self, prefix: str, every_s: float = 10.0):
        self.prefix, self.every_s = prefix, every_s
        self.t0 = self.last = time.perf_counter()
        self.first_step: int | None = None

    def __call__(self, step: int, total: int, loss: float) -> None:
        """Step ``step`` of ``total`` finished with ``loss``; print a progress line when one is due."""
        now = time.perf_counter()
        if self.first_step is None:  # the rate counts from the first step on, after start-up costs
            self.first_step, self.t0 = step, now
            return
        if now - self.last >= self.every_s or step == total:
            rate = (step - self.first_step) / max(now - self.t0, 1e-9)
            eta = (total - step) / max(rate, 1e-9)
            print(f"    {self.prefix} step {step}/{total} loss {loss:.4f} {rate:.2f} steps/s eta {eta:.0f}s",
                  flush=True)
            self.last = now


def cell_run_id(preset: str, task: str, mixer: str, seed: int) -> str:
    """The results-store run id of one arena cell."""
    return f"arena-{preset}-{task}-{mixer}-s{seed}"


def train_config(spec: TaskSpec, seed: int, steps: int | None = None) -> TrainConfig:
    """The TrainConfig of a task's optimizer settings (LRA's rsqrt becomes lr*sqrt(warmup/step))."""
    o = spec.optim
    total = steps or o["steps"]
    lr, schedule = o["lr"], o["schedule"]
    if schedule == "rsqrt":  # base * min(1, s/w) / sqrt(max(s, w)): peak base/sqrt(w), then ~1/sqrt(s)
        lr, schedule = lr / math.sqrt(max(1, o["warmup"])), "inverse_sqrt"
    return TrainConfig(
        seed=seed, steps=total, batch_size=o["batch_size"], lr=lr, schedule=schedule,
        warmup_steps=min(o["warmup"], total), weight_decay=o["weight_decay"], betas=tuple(o["betas"]),
        eps=o["eps"], clip_grad=o["grad_clip"], min_lr_ratio=0.0, eval_every=0, checkpoint_every=0,
        log_every=max(1, total // 100),  # reports often enough for a line every ~10 s on a slow CPU
        eval_batch_size=max(64, o["batch_size"]),
    )


def model_config(spec: TaskSpec, mixer: str, mixer_options: dict | None = None):
    """The task's model with ``mixer``; causal-only mixers run as causal encoders."""
    causal = bool(MIXERS.get(mixer).capabilities.why_not(mixer, causal=False))
    return build_config(spec.model_config(mixer=mixer, mixer_options=mixer_options or {}, encoder_causal=causal))


PIXEL_TASKS = ("image", "pathfinder", "pathx")  # square grey images, read as one token per pixel


def image_model_config(spec: TaskSpec, mixer: str):
    """The task's model as an image classifier with 2-D ``mixer``: patch 1, so it sees the very pixels (one
    token each) that the 1-D mixers see, on their (side, side) grid, with the same width, depth and heads."""
    if spec.name not in PIXEL_TASKS:
        raise CapabilityError(f"mixer {mixer!r} mixes a 2-D grid, so it runs only on the image tasks "
                              f"({', '.join(PIXEL_TASKS)}), not on {spec.name!r}")
    m, side = spec.model_config(), math.isqrt(spec.seq_len)
    return build_vision_config(dict(
        task="image", image_size=side, in_channels=1, patch_size=1, n_classes=spec.n_classes, pooling="mean",
        positional="learned", norm=m["norm"], ffn=m["ffn"], ffn_mult=m["ffn_mult"], dropout=m["dropout"],
        attn_dropout=m["attn_dropout"], stages=[dict(depth=m["n_layers"], d_model=m["d_model"],
                                                     n_heads=m["n_heads"], mixer=mixer)]))


@dataclass
class CellResult:
    """What one cell did: its run id, status and headline numbers (or the error)."""

    run_id: str
    status: str  # done, skipped, failed, missing-data, unsupported
    accuracy: float | None = None
    seconds: float = 0.0
    error: str = ""


def is_done(store: ResultsStore, run_id: str) -> bool:
    """Whether a cell already has a stored test accuracy."""
    return any(e["split"] == "test" and e["metric"] == "accuracy" for e in store.evals(run_id))


def run_cell(spec: TaskSpec, mixer: str, seed: int, store: ResultsStore, out_root: str | Path = "runs/arena",
             data_dir: str | Path | None = None, steps: int | None = None,
             on_step: Callable[[int, int, float], None] | None = None) -> CellResult:
    """Train and evaluate one (task, mixer, seed) cell; results go to ``store``."""

    run_id = cell_run_id(spec.preset, spec.name, mixer, seed)
    if is_done(store, run_id):
        return CellResult(run_id, "skipped")
    t0 = time.perf_counter()
    grid = MIXERS.get(mixer).capabilities.grid  # a 2-D mixer: an image model on the task's pixels
    try:
        cfg = image_model_config(spec, mixer) if grid else model_config(spec, mixer)
    except CapabilityError as e:
        return CellResult(run_id, "failed", error=str(e))
    try:
        train, val, test = build_datasets(spec, spec.preset, data_dir=data_dir, seed=0)
    except DataError as e:
        return CellResult(run_id, "missing-data", error=str(e))
    if grid:
        side = math.isqrt(spec.seq_len)
        train, val, test = (token_images(d, side) for d in (train, val, test))
    tcfg = train_config(spec, seed, steps)
    torch.manual_seed(seed)  # the initial weights depend on the cell's seed alone, not on earlier cells
    model = create_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    run_config = {"arena": {"preset": spec.preset, "task": spec.name, "mixer": mixer, "seed": seed},
                  "model": cfg.model_dump(), "train": tcfg.model_dump()}
    trainer = Trainer(model, tcfg, train, eval_data=None, store=store, run_id=run_id,
                      out_dir=Path(out_root) / run_id, run_config=run_config, progress_stream=io.StringIO(),
                      kind="arena", on_step=on_step)
    base = rss_kb("VmRSS")
    reset_peak_rss()
    try:
        t_train = time.perf_counter()
        trainer.fit()
        train_s = time.perf_counter() - t_train
        peak_mb = max(0, rss_kb("VmHWM") - base) / 1024
        val_m, test_m = trainer.evaluate(val), trainer.evaluate(test)
    except (EfformerError, RuntimeError) as e:
        return CellResult(run_id, "failed", seconds=time.perf_counter() - t0, error=str(e).splitlines()[0])
    store.log_eval(run_id, "val", {"accuracy": val_m["accuracy"], "loss": val_m["loss"]}, step=tcfg.steps)
    store.log_eval(run_id, "cost", {"params": n_params, "steps_per_s": tcfg.steps / train_s, "peak_mem_mb": peak_mb,
                                    "train_seconds": train_s}, step=tcfg.steps)
    store.log_eval(run_id, "test", {"accuracy": test_m["accuracy"], "loss": test_m["loss"]}, step=tcfg.steps)
    store.log_eval(run_id, "chance", {"accuracy": chance_accuracy(test)}, step=tcfg.steps)  # majority class
    if hasattr(test, "baseline"):  # recall tasks: what no recall reaches, and the first query, where it cannot help
        store.log_eval(run_id, "baseline", {"accuracy": test.baseline[0], "first_query": test.baseline[1]},
                       step=tcfg.steps)
        store.log_eval(run_id, "test_first_query", {"accuracy": first_query_accuracy(model, test)}, step=tcfg.steps)
    return CellResult(run_id, "done", accuracy=test_m["accuracy"], seconds=time.perf_counter() - t0)


@dataclass
class ArenaCell:
    """One cell as a picklable job for a fresh worker process (honest peak memory, crash isolation)."""

    spec: TaskSpec
    mixer: str
    seed: int
    store_path: str
    out_root: str
    data_dir: str | None
    steps: int | None
    device: str = "cpu"
    progress: str | None = None  # prefix of the progress lines this cell prints while training; None: silent

    def key(self) -> dict[str, Any]:
        """Identifying fields of the cell (rows of failed workers carry them)."""
        return {"run_id": cell_run_id(self.spec.preset, self.spec.name, self.mixer, self.seed)}

    def run(self, peak: float | None = None) -> dict[str, Any]:
        """Train and evaluate the cell in this process; a CellResult as a dict."""
        on_step = None if self.progress is None else CellProgress(self.progress)
        res = run_cell(self.spec, self.mixer, self.seed, ResultsStore(self.store_path), self.out_root, self.data_dir,
                       self.steps, on_step=on_step)
        return dataclasses.asdict(res)


def default_tasks(preset: str, data_dir: str | Path | None) -> list[str]:
    """Synthetic tasks always; file-based tasks when ``data_dir`` holds their files."""
    tasks = list(SYNTHETIC_DEFAULT[preset])
    if data_dir is not None:
        for name in ("text", "retrieval", "image"):
            spec = get_task(name, preset)
            try:
                build_datasets(spec, preset, data_dir=data_dir)
            except DataError:
                continue
            tasks.append(name)
    return tasks


def run_grid(preset: str = "quick", mixers: list[str] | None = None, tasks: list[str] | None = None,
             seeds: list[int] | tuple[int, ...] = (0,), store: ResultsStore | None = None,
             out_root: str | Path = "runs/arena", data_dir: str | Path | None = None, steps: int | None = None,
             log=print, in_process: bool = False, cell_timeout_s: float = 3600.0) -> list[CellResult]:
    """Run every (task, mixer, seed) cell not already done; returns one CellResult per cell.

    Each cell trains in a fresh worker process (unless ``in_process``), so its peak memory is its own
    and a crash or out-of-memory kill is recorded as a failed cell instead of ending the grid.
    """

    store = store or ResultsStore()
    if not mixers:
        mixers, left_out = default_mixers(preset)
        if left_out:
            log(f"left out of the default {preset} grid ({len(mixers)} mixers): {', '.join(left_out)}; include "
                f"them with --mixers {' '.join(left_out)} (or --mixers all)")
    elif list(mixers) == ["all"]:
        mixers = sequence_mixers()
    for m in mixers:
        MIXERS.get(m)  # unknown names fail before any training
    tasks = tasks or default_tasks(preset, data_dir)
    for t in tasks:
        if (preset, t) in NOT_OFFERED:
            raise ConfigError("--tasks", t, f"not offered under preset {preset!r}: {NOT_OFFERED[(preset, t)]}")
    results: list[CellResult] = []
    cells = [(t, m, s) for t in tasks for s in seeds for m in mixers]
    missing: dict[str, str] = {}
    for task in tasks:  # generate or check each task's data once, here, so workers only read the cache
        try:
            build_datasets(get_task(task, preset), preset, data_dir=data_dir, seed=0)
        except DataError as e:
            missing[task] = str(e)
    for i, (task, mixer, seed) in enumerate(cells, 1):
        spec = get_task(task, preset)
        run_id = cell_run_id(spec.preset, task, mixer, seed)
        if task in missing:
            results.append(CellResult(run_id, "missing-data", error=missing[task]))
            continue
        if spec.task == "lm" and not MIXERS.get(mixer).capabilities.causal:  # recall tasks are causal LMs
            results.append(CellResult(run_id, "unsupported", error=f"{mixer} is bidirectional only; {task} is a "
                                                                   "causal language-model task"))
            log(f"[{i}/{len(cells)}] {preset}/{task}/{mixer}/seed{seed}: unsupported — {results[-1].error}")
            continue
        if is_done(store, run_id):
            res = CellResult(run_id, "skipped")
        else:
            folder = None if data_dir is None else str(data_dir)
            name = f"[{i}/{len(cells)}] {preset}/{task}/{mixer}/seed{seed}"
            n_steps = steps or spec.optim["steps"]
            log(f"{name}: training {n_steps} steps ...")
            cell = ArenaCell(spec, mixer, seed, str(store.path), str(out_root), folder, steps, progress=name)
            row = cell.run() if in_process else measure_in_worker(cell, timeout_s=cell_timeout_s)
            res = CellResult(**{k: row[k] for k in ("run_id", "status", "accuracy", "seconds", "error") if k in row})
            if "status" in row and row["status"] in ("timeout", "oom", "error"):
                res = CellResult(run_id, "failed", error=f"{row['status']}: {row.get('error', '')}")
        results.append(res)
        acc = "" if res.accuracy is None else f" test acc {res.accuracy:.3f}"
        log(f"[{i}/{len(cells)}] {preset}/{task}/{mixer}/seed{seed}: {res.status}{acc} "
            f"({res.seconds:.0f}s){' — ' + res.error if res.error else ''}")
    return results


def run_steps(run: dict[str, Any]) -> int | None:
    """The training steps an arena run was configured with."""
    return json.loads(run["config"]).get("train", {}).get("steps")


def summary_rows(store: ResultsStore, preset: str) -> list[dict[str, Any]]:
    """One dict per stored arena cell of ``preset``: task, mixer, seed, test accuracy, chance level and costs."""
    out = []
    for run in store.runs("arena"):
        cfg = json.loads(run["config"]).get("arena", {})
        if cfg.get("preset") != preset:
            continue
        ev = {(e["split"], e["metric"]): e["value"] for e in store.evals(run["run_id"])}
        if ("test", "accuracy") not in ev:
            continue
        out.append({"task": cfg["task"], "mixer": cfg["mixer"], "seed": cfg["seed"], "preset": preset,
                    "accuracy": ev[("test", "accuracy")], "params": ev.get(("cost", "params")),
                    "steps_per_s": ev.get(("cost", "steps_per_s")), "peak_mem_mb": ev.get(("cost", "peak_mem_mb")),
                    "chance": ev.get(("chance", "accuracy")), "baseline": ev.get(("baseline", "accuracy")),
                    "first_query": ev.get(("test_first_query", "accuracy")),
                    "first_query_baseline": ev.get(("baseline", "first_query")),
                    "train_seconds": ev.get(("cost", "train_seconds")),
                    "steps": run_steps(run)})
    return out
