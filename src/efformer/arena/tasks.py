"""The Long Range Arena tasks: what each task is, its hyperparameters per preset, and its datasets.

From "Long Range Arena: A Benchmark for Efficient Transformers" (Tay et al., ICLR 2021). Two presets:
- `paper`: the official repo configs (reference §4.1), for a GPU. `notes` records where the paper's
  appendix (§4.2) says otherwise.
- `quick`: reduced lengths and sizes with the same generators and readers, sized so a grid of every
  mixer on the synthetic quick tasks finishes in minutes on 2 CPU cores. Never comparable to `paper`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from efformer.data import listops as lo
from efformer.data import loaders as ld
from efformer.data import pathfinder as pf
from efformer.data import recall as rc
from efformer.errors import ConfigError, DataError, UnknownNameError

PRESETS = ("paper", "quick")
TASK_NAMES = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
RECALL_NAMES = ("mqar", "selective_copy", "induction", "needle")  # efformer.data.recall: causal LM tasks


@dataclass(frozen=True)
class TaskSpec:
    """One LRA task under one preset: data, model and optimizer settings."""

    name: str
    preset: str
    task: Literal["classifier", "dual", "lm"]  # lm: the recall tasks, per-position targets
    seq_len: int  # tokens per sequence (per document for the dual task)
    vocab_size: int
    n_classes: int
    pooling: Literal["cls", "mean"]
    source: Literal["synthetic", "files"]  # generated here, or read from the user's data_dir
    data: dict[str, Any]  # generator / reader settings
    model: dict[str, Any]  # d_model, n_layers, n_heads, ffn_mult, dropout, attn_dropout, positional, norm, ffn
    optim: dict[str, Any]  # lr, weight_decay, warmup, steps, batch_size, schedule, betas, eps, grad_clip
    metric: str = "accuracy"
    notes: str = ""
    expected_layout: str = ""  # for file-based tasks: what build_datasets looks for under data_dir
    extra: dict[str, Any] = field(default_factory=dict)

    def model_config(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for efformer.config.build_config (a CLS token adds one position)."""
        if self.task == "lm":
            return {"task": "lm", "vocab_size": self.vocab_size, "max_len": self.seq_len, "pad_id": 0, **self.model,
                    **{k: v for k, v in overrides.items() if k != "encoder_causal"}}  # an LM is causal anyway
        cfg = {"task": self.task, "vocab_size": self.vocab_size, "n_classes": self.n_classes,
               "pooling": self.pooling, "max_len": self.seq_len + (self.pooling == "cls"), "pad_id": 0,
               **self.model}
        if self.task == "dual":
            cfg.setdefault("dual_features", "uv")
        return {**cfg, **overrides}


def _model(d: int, layers: int, heads: int, mlp: int, drop: float, attn_drop: float, pos: str) -> dict[str, Any]:
    # the LRA Transformer: pre-LayerNorm blocks with a GELU MLP of width mlp_dim
    return {"d_model": d, "n_layers": layers, "n_heads": heads, "ffn_mult": mlp / d, "dropout": drop,
            "attn_dropout": attn_drop, "positional": pos, "norm": "layernorm", "norm_placement": "pre",
            "ffn": "gelu"}


def _optim(lr: float, wd: float, warmup: int, steps: int, batch: int, schedule: str, clip: float | None = None):
    return {"lr": lr, "weight_decay": wd, "warmup": warmup, "steps": steps, "batch_size": batch,
            "schedule": schedule, "betas": (0.9, 0.98), "eps": 1e-9, "grad_clip": clip}


# schedule names: "rsqrt" = base * min(1, s/w) / sqrt(max(s, w)) (base lr 0.05 peaks near 1.6e-3 for ListOps);
# "cosine" = linear warmup then cosine decay to 0.
_PAPER = {
    "listops": TaskSpec(
        "listops", "paper", "classifier", 2000, ld.LISTOPS_VOCAB_SIZE, 10, "cls", "synthetic",
        {"min_len": 500, "max_len": 2000, "max_depth": 10, "n_train": 96_000, "n_val": 2_000, "n_test": 2_000},
        _model(512, 4, 8, 1024, 0.1, 0.1, "sinusoidal"), _optim(0.05, 0.1, 1000, 5000, 32, "rsqrt"),
        notes="appendix: 6 layers, FFN 2048"),
    "text": TaskSpec(
        "text", "paper", "classifier", 1000, ld.BYTE_VOCAB_SIZE, 2, "cls", "files", {"val_is_test": True},
        _model(256, 4, 4, 1024, 0.1, 0.1, "sinusoidal"), _optim(0.05, 0.1, 8000, 20_000, 32, "rsqrt"),
        notes="repo max_len 1000; paper says 4K (best of 1K-4K), 6 layers, d 512, 8 heads, FFN 2048",
        expected_layout="aclImdb/{train,test}/{pos,neg}/*.txt"),
    "retrieval": TaskSpec(
        "retrieval", "paper", "dual", 4000, ld.BYTE_VOCAB_SIZE, 2, "cls", "files", {},
        _model(128, 4, 4, 512, 0.1, 0.1, "sinusoidal"), _optim(0.05, 0.1, 8000, 5000, 32, "rsqrt"),
        notes="head on [u, v] (repo default); appendix: [u, v, u*v, u-v] and 'lr 0.5'",
        expected_layout="tsv_data/new_aan_pairs.{train,eval,test}.tsv"),
    "image": TaskSpec(
        "image", "paper", "classifier", 1024, ld.PIXEL_VOCAB_SIZE, 10, "cls", "files", {},
        _model(128, 1, 8, 128, 0.3, 0.2, "learned"), _optim(5e-4, 0.0, 175, 35_000, 256, "cosine"),
        notes="qkv_dim 64 in the repo; appendix: 3 layers, 4 heads, lr 0.01",
        expected_layout="cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin"),
    "pathfinder": TaskSpec(
        "pathfinder", "paper", "classifier", 1024, ld.PIXEL_VOCAB_SIZE, 2, "mean", "synthetic",
        {"resolution": 32, "difficulty": "hard", "n": 200_000},
        _model(32, 4, 4, 32, 0.2, 0.1, "sinusoidal"), _optim(1e-3, 0.0, 312, 62_400, 512, "cosine"),
        notes="qkv_dim 16 in the repo; appendix: 8 heads, FFN 128, qkv 128, lr 0.01"),
    "pathx": TaskSpec(
        "pathx", "paper", "classifier", 16_384, ld.PIXEL_VOCAB_SIZE, 2, "mean", "synthetic",
        {"resolution": 128, "difficulty": "hard", "n": 200_000},
        _model(32, 1, 2, 32, 0.1, 0.1, "learned"), _optim(1e-3, 0.0, 2500, 500_000, 64, "cosine", 1.0),
        notes="qkv_dim 16 in the repo; every model in the paper FAILs"),
}

_QUICK_MODEL = _model(64, 2, 4, 128, 0.1, 0.0, "sinusoidal")
_QUICK = {
    "listops": TaskSpec(
        "listops", "quick", "classifier", 64, ld.LISTOPS_VOCAB_SIZE, 10, "cls", "synthetic",
        {"min_len": 16, "max_len": 64, "max_depth": 3, "n_train": 4000, "n_val": 500, "n_test": 500},
        dict(_QUICK_MODEL, dropout=0.0), _optim(3e-3, 0.01, 50, 250, 32, "cosine"),
        notes="depth 3, 16-64 tokens, no dropout: softmax, bigbird and cosformer reached 36-40% in 400 steps "
              "where the majority label is ~17-20%; 250 steps (softmax 35%, bigbird 39%) keep `make demo` "
              "near 10 minutes on 2 cores; with dropout 0.1, or depth 4-5 at 24-128 tokens, many mixers "
              "stayed at the majority rate in that budget"),
    "text": TaskSpec(
        "text", "quick", "classifier", 256, ld.BYTE_VOCAB_SIZE, 2, "cls", "files",
        {"val_is_test": True, "max_train": 4000, "max_eval": 1000},
        _QUICK_MODEL, _optim(2e-3, 0.01, 50, 300, 32, "cosine"), expected_layout=_PAPER["text"].expected_layout),
    "retrieval": TaskSpec(
        "retrieval", "quick", "dual", 256, ld.BYTE_VOCAB_SIZE, 2, "cls", "files", {"max_train": 4000,
                                                                                     "max_eval": 1000},
        _QUICK_MODEL, _optim(2e-3, 0.01, 50, 300, 32, "cosine"),
        expected_layout=_PAPER["retrieval"].expected_layout),
    "image": TaskSpec(
        "image", "quick", "classifier", 1024, ld.PIXEL_VOCAB_SIZE, 10, "cls", "files",
        {"max_train": 4000, "max_eval": 1000},
        _model(32, 1, 4, 64, 0.1, 0.0, "learned"), _optim(2e-3, 0.0, 20, 200, 32, "cosine"),
        expected_layout=_PAPER["image"].expected_layout),
    "pathfinder": TaskSpec(
        "pathfinder", "quick", "classifier", 1024, ld.PIXEL_VOCAB_SIZE, 2, "mean", "synthetic",
        {"resolution": 32, "difficulty": "easy", "n": 1500},
        _model(32, 1, 4, 64, 0.0, 0.0, "learned"), _optim(2e-3, 0.0, 20, 150, 32, "cosine"),
        notes="easy level (contour 6); NOT offered by `efformer arena --preset quick`: it ended below chance "
              "(46% vs 50%) in this CPU budget (see efformer.arena.runner.NOT_OFFERED)"),
    "pathx": TaskSpec(
        "pathx", "quick", "classifier", 4096, ld.PIXEL_VOCAB_SIZE, 2, "mean", "synthetic",
        {"resolution": 64, "difficulty": "easy", "n": 600},
        _model(32, 1, 2, 64, 0.0, 0.0, "learned"), _optim(2e-3, 0.0, 10, 60, 16, "cosine"),
        notes="64 px stands in for 128 px on CPU"),
}
TASKS: dict[str, dict[str, TaskSpec]] = {"paper": _PAPER, "quick": _QUICK}


def _generator_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A recall task's generator options: its data settings less the split sizes."""
    return {k: v for k, v in data.items() if k not in ("n_train", "n_val", "n_test")}


def _recall(name: str, preset: str, data: dict[str, Any], model: dict[str, Any], optim: dict[str, Any],
            notes: str = "") -> TaskSpec:
    """A recall task: a causal LM scored on its asked positions (n_classes and pooling are unused)."""
    opts, make = rc.GENERATORS[name]
    probe = make(opts(**_generator_settings(data), n_examples=1))
    return TaskSpec(name, preset, "lm", probe.seq_len, probe.vocab_size, probe.answers, "mean", "synthetic",
                    data, model, optim, notes=notes)


_RECALL_MODEL = _model(64, 2, 4, 128, 0.0, 0.0, "sinusoidal")  # one positional scheme every mixer takes
_SPLITS = {"n_train": 4000, "n_val": 500, "n_test": 500}
# Zoology's MQAR grid (Arora et al. 2023, section 3): sequence length 64-512, 4-64 key-value pairs, widths
# 64-512, 2 layers, 8192-token vocabulary, 100K training examples; "paper" takes one cell of it.
RECALL: dict[str, dict[str, TaskSpec]] = {
    "quick": {
        "mqar": _recall("mqar", "quick", {"seq_len": 64, "n_pairs": 8, "n_keys": 32, "n_values": 32, **_SPLITS},
                        _RECALL_MODEL, _optim(3e-3, 0.1, 30, 400, 32, "cosine"),
                        notes="64 tokens, 8 pairs, 32 keys and 32 values; chance 1/32, but guessing among the "
                              "context's unanswered values scores H_8/8 = 34% with no recall (1/8 on the first "
                              "query): read the cells against that baseline and the first-query accuracy"),
        "selective_copy": _recall("selective_copy", "quick", {"seq_len": 48, "n_tokens": 8, "n_symbols": 16,
                                                              **_SPLITS},
                                  _RECALL_MODEL, _optim(3e-3, 0.1, 30, 400, 32, "cosine")),
        "induction": _recall("induction", "quick", {"seq_len": 64, "n_symbols": 16, **_SPLITS},
                             _RECALL_MODEL, _optim(3e-3, 0.1, 30, 400, 32, "cosine")),
        "needle": _recall("needle", "quick", {"seq_len": 128, "n_keys": 16, "n_values": 16, "n_distractors": 3,
                                              "n_noise": 32, **_SPLITS},
                          _RECALL_MODEL, _optim(3e-3, 0.1, 30, 400, 32, "cosine")),
    },
    "paper": {
        "mqar": _recall("mqar", "paper", {"seq_len": 256, "n_pairs": 16, "n_keys": 4096, "n_values": 4096,
                                          "n_train": 100_000, "n_val": 3000, "n_test": 3000},
                        dict(_RECALL_MODEL, d_model=128), _optim(1e-3, 0.1, 500, 20_000, 64, "cosine"),
                        notes="one cell of Zoology's grid (L 256, 16 pairs, width 128)"),
    },
}

# Table 1 of the LRA paper: test accuracy (%); None = FAIL. Averages over the 5 tasks without Path-X.
PAPER_TABLE1: dict[str, dict[str, float | None]] = {
    name: dict(zip(("listops", "text", "retrieval", "image", "pathfinder", "pathx", "avg"), row, strict=True))
    for name, row in {
        "Transformer": (36.37, 64.27, 57.46, 42.44, 71.40, None, 54.39),
        "Local Attention": (15.82, 52.98, 53.39, 41.46, 66.63, None, 46.06),
        "Sparse Trans.": (17.07, 63.58, 59.59, 44.24, 71.71, None, 51.24),
        "Longformer": (35.63, 62.85, 56.89, 42.22, 69.71, None, 53.46),
        "Linformer": (35.70, 53.94, 52.27, 38.56, 76.34, None, 51.36),
        "Reformer": (37.27, 56.10, 53.40, 38.07, 68.50, None, 50.67),
        "Sinkhorn Trans.": (33.67, 61.20, 53.83, 41.23, 67.45, None, 51.29),
        "Synthesizer": (36.99, 61.68, 54.67, 41.61, 69.45, None, 52.88),
        "BigBird": (36.05, 64.02, 59.29, 40.83, 74.87, None, 55.01),
        "Linear Trans.": (16.13, 65.90, 53.09, 42.34, 75.30, None, 50.55),
        "Performer": (18.01, 65.40, 53.82, 42.77, 77.05, None, 51.41),
    }.items()
}


def get_task(name: str, preset: str = "quick") -> TaskSpec:
    """The TaskSpec of an LRA task under a preset."""
    if preset not in TASKS:
        raise ConfigError("preset", preset, f"one of {list(TASKS)}")
    if name in RECALL[preset]:
        return RECALL[preset][name]
    if name not in TASKS[preset]:
        raise UnknownNameError("arena task", name, {**TASKS[preset], **RECALL[preset]})
    return TASKS[preset][name]


def _settings_key(settings: dict[str, Any]) -> str:
    """A short digest of generator settings, so a cache folder never serves data made with others."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _listops(spec: TaskSpec, cache: Path, seed: int, workers: int):
    d = spec.data
    cfg = lo.ListOpsConfig(**{k: d[k] for k in ("min_len", "max_len", "max_depth", "n_train", "n_val", "n_test")})
    folder = cache / f"listops-{spec.preset}-{_settings_key(d)}-seed{seed}"  # new settings, new folder
    paths = {s: folder / f"{cfg.task}_{s}.tsv" for s in lo.SPLITS}
    if not all(p.exists() for p in paths.values()):
        lo.generate_files(folder, cfg, seed=seed, workers=workers)
    return tuple(ld.read_listops_tsv(paths[s], max_len=spec.seq_len) for s in lo.SPLITS)


def _pathfinder(spec: TaskSpec, cache: Path, seed: int, workers: int):
    d = spec.data
    folder = cache / f"pathfinder-{spec.preset}-{_settings_key(d)}-seed{seed}"
    root = folder / f"pathfinder{d['resolution']}" / pf.DIFFICULTIES[d["difficulty"]][0]
    if not (root / "done").exists():  # written last, so an interrupted run is regenerated
        pf.generate_files(folder, d["resolution"], d["difficulty"], n=d["n"], seed=seed, workers=workers)
        (root / "done").write_text("ok\n")
    ds, _ = ld.read_pathfinder(root)
    return ld.split_80_10_10(ds)


def _cap(ds, n: int | None):
    if n is None or len(ds) <= n:
        return ds
    if isinstance(ds, ld.PairDataset):
        return ld.PairDataset(ld.subset(ds.first, 0, n), ld.subset(ds.second, 0, n))
    return ld.subset(ds, 0, n)


def _files(spec: TaskSpec, data_dir: Path | None):
    if data_dir is None:
        raise DataError(f"task {spec.name!r} reads real files: pass data_dir containing {spec.expected_layout}")
    data_dir = Path(data_dir)
    if spec.name == "text":
        train, test = ld.read_imdb(data_dir, "train", spec.seq_len), ld.read_imdb(data_dir, "test", spec.seq_len)
        out = (train, test, test)  # IMDb has no validation split; LRA validates on test
    elif spec.name == "retrieval":
        root = data_dir / "tsv_data" if (data_dir / "tsv_data").is_dir() else data_dir
        out = tuple(ld.read_aan_tsv(root / f"new_aan_pairs.{s}.tsv", spec.seq_len) for s in ("train", "eval", "test"))
    else:
        out = ld.read_cifar10(data_dir)
    caps = (spec.data.get("max_train"), spec.data.get("max_eval"), spec.data.get("max_eval"))
    return tuple(_cap(ds, c) for ds, c in zip(out, caps, strict=True))


def build_datasets(spec: TaskSpec | str, preset: str = "quick", data_dir: str | Path | None = None, seed: int = 0,
                   workers: int = 1):
    """(train, val, test) datasets of a task: synthetic ones are generated into a cache when missing.

    The cache is data_dir/generated (or runs/data without data_dir); file-based tasks read data_dir.
    """
    if isinstance(spec, str):
        spec = get_task(spec, preset)
    if spec.source == "files":
        return _files(spec, None if data_dir is None else Path(data_dir))
    if spec.name in RECALL_NAMES:  # generated in memory in well under a second: no cache
        opts, make = rc.GENERATORS[spec.name]
        return tuple(make(opts(**_generator_settings(spec.data), n_examples=spec.data[f"n_{s}"], seed=3 * seed + i))
                     for i, s in enumerate(("train", "val", "test")))
    cache = Path(data_dir) / "generated" if data_dir is not None else Path("runs") / "data"
    cache.mkdir(parents=True, exist_ok=True)
    if spec.name == "listops":
        return _listops(spec, cache, seed, workers)
    return _pathfinder(spec, cache, seed, workers)


__all__ = ["PAPER_TABLE1", "PRESETS", "RECALL", "RECALL_NAMES", "TASKS", "TASK_NAMES", "TaskSpec", "build_datasets",
           "get_task"]
