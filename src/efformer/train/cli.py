"""Subcommands ``train``, ``eval``, ``runs`` (list | show | compare) and ``report`` of the efformer CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from efformer.data.text import TOKENIZER_FILE, tokenizer_file
from efformer.errors import CheckpointError, ConfigError
from efformer.models import create_model, load
from efformer.results import DEFAULT_PATH, ResultsStore
from efformer.train import distributed as D
from efformer.train import report
from efformer.train.checkpoint import list_checkpoints, load_checkpoint, model_tensors
from efformer.train.config import RunConfig, build_run_config, load_config_file, load_run_config
from efformer.train.data import build_datasets
from efformer.train.report import write_report
from efformer.train.trainer import Trainer


def run_training(cfg: RunConfig, resume: bool | str = False, progress_stream=None) -> dict[str, float]:
    """Build the model and data of a run config and train it (under torchrun: on every rank)."""
    out = cfg.output_dir()
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", str(out), "is a file; the run folder must be a folder (set out_dir or --out)")
    if not resume and list_checkpoints(out / "checkpoints"):
        raise ConfigError("out_dir", str(out), "already holds checkpoints; pass --resume to continue that run "
                          "or set out_dir (or name) to start a new one")
    info = D.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every run
    model = create_model(cfg.build_model_config())
    train_data, eval_data = build_datasets(cfg.data, model.cfg)
    store = ResultsStore(cfg.results) if info.is_main else None
    tokenizer = cfg.data.options.get("tokenizer") if cfg.data.name == "text" else None
    files = {TOKENIZER_FILE: tokenizer_file(tokenizer, "data.options.tokenizer").read_bytes()} if tokenizer else None
    trainer = Trainer(model, cfg.train, train_data, eval_data, store=store, out_dir=out,
                      run_config=cfg.model_dump(), progress_stream=progress_stream, model_files=files)
    try:
        if resume:
            path = None if resume is True else resume
            if trainer.resume(path) and info.is_main:
                print(f"resumed from step {trainer.step}", flush=True)
        return trainer.fit()
    finally:
        D.teardown()


def _cmd_train(args) -> int:
    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.results:
        overrides.append(f"results={args.results}")
    cfg = load_run_config(args.config, overrides)
    final = run_training(cfg, resume=args.resume if args.resume is not None else False)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(final, indent=2))
    return 0


def _cmd_eval(args) -> int:
    path = Path(args.checkpoint)
    if (path / "config.json").is_file():  # a saved model folder: the data must come from --config
        model, raw_cfg = load(path), {}
    else:
        tensors, meta = load_checkpoint(path)
        raw_cfg = meta["run_config"]
        model = create_model(meta["model_config"])
        missing = model.load_state_dict(model_tensors(tensors), strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise CheckpointError(f"{path}: weights do not match the model config ({missing})")
    data = {**raw_cfg, **load_config_file(args.config)} if args.config else raw_cfg
    data = {**data, "model": model.cfg.model_dump()}
    if not data.get("data") and not args.set:
        raise ConfigError("data", None, "a saved model folder has no data section; pass --config RUN.yaml")
    cfg = build_run_config(data, args.set)
    # The Trainer sizes its batches on its training set: give it the run's own training split (which
    # trained at this batch size), not the eval split, which is often smaller than one batch.
    train_data, eval_data = build_datasets(cfg.data, model.cfg)
    train_cfg = cfg.train.model_copy(update={"device": args.device or cfg.train.device})
    trainer = Trainer(model, train_cfg, train_data, eval_data, out_dir=cfg.output_dir())
    metrics = trainer.evaluate()
    if args.results:
        run_id = args.run_id or f"eval-{path.name}"
        store = ResultsStore(args.results)
        store.start_run(run_id, "eval", cfg.model_dump(), name=str(path), device=str(trainer.info.device))
        store.log_eval(run_id, "eval", metrics)
        store.finish_run(run_id)
    print(json.dumps(metrics, indent=2))
    return 0


def _store(args) -> ResultsStore:
    path = Path(args.results)
    if not path.is_file():
        raise ConfigError("--results", str(path), "no results file there; train a run first or pass --results PATH")
    return ResultsStore(path)


def _cmd_runs(args) -> int:
    store = _store(args)
    if args.action == "list":
        print(report.runs_table(store, args.kind))
    elif args.action == "show":
        if len(args.run_ids) != 1:
            raise ConfigError("runs show", args.run_ids, "give exactly one run id")
        print(report.show_run(store, args.run_ids[0]))
    else:
        if len(args.run_ids) < 2:
            raise ConfigError("runs compare", args.run_ids, "give two or more run ids")
        print(report.compare_runs(store, args.run_ids))
    return 0


def _cmd_report(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError("--out", args.out, "is a file; give a folder for the report (created if missing)")
    store = _store(args)
    for run_id in args.runs or []:
        report.get_run(store, run_id)  # an unknown run id fails before the report folder is made
    path = write_report(store, args.out, args.runs or None)
    print(f"wrote {path}")
    return 0


def register(sub: Any) -> None:
    """Add train, eval, runs and report to the ``efformer`` argument parser."""
    t = sub.add_parser("train", help="train a model from a run config (works under torchrun)")
    t.add_argument("config", nargs="?", default=None, help="YAML or JSON run config (model, train, data sections)")
    t.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the run folder, or from CHECKPOINT")
    t.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    t.add_argument("--results", default=None, help=f"results store (default {DEFAULT_PATH})")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a training checkpoint or saved model on its eval data")
    e.add_argument("checkpoint", help="step_* folder, run folder, or saved model folder (then give --config)")
    e.add_argument("--config", default=None)
    e.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    e.add_argument("--device", default=None)
    e.add_argument("--results", default=None, help="also record the evaluation in this results store")
    e.add_argument("--run-id", default=None)
    e.set_defaults(fn=_cmd_eval)
    r = sub.add_parser("runs", help="list, show or compare runs in the results store")
    r.add_argument("action", choices=["list", "show", "compare"])
    r.add_argument("run_ids", nargs="*")
    r.add_argument("--kind", default=None)
    r.add_argument("--results", default=str(DEFAULT_PATH))
    r.set_defaults(fn=_cmd_runs)
    p = sub.add_parser("report", help="markdown tables and PNG plots from the results store")
    p.add_argument("--out", default="runs/report")
    p.add_argument("--runs", nargs="*", default=None, help="run ids to compare (default: all)")
    p.add_argument("--results", default=str(DEFAULT_PATH))
    p.set_defaults(fn=_cmd_report)
