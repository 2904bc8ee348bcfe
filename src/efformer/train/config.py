"""Run configuration: a model section (ModelConfig keys or a preset), a train section (TrainConfig)
and a data section (a dataset name + its options), read from YAML/JSON with ``--set key.path=value``
overrides. Every bad value raises a ConfigError that names the full key path and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from efformer.errors import ConfigError, UnknownNameError
from efformer.models.config import ModelConfig, build_config
from efformer.models.factory import PRESETS
from efformer.options import StrictModel
from efformer.train.data import check_data_config

Schedule = Literal["cosine", "linear", "constant", "inverse_sqrt"]
Precision = Literal["fp32", "bf16"]
Parallel = Literal["ddp", "fsdp"]


class TrainConfig(StrictModel):
    """Optimiser, schedule, batching, evaluation, checkpointing and logging settings of one run."""

    seed: int = 0
    steps: int = pydantic.Field(1000, gt=0)  # optimizer steps
    batch_size: int = pydantic.Field(32, gt=0)  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = pydantic.Field(1, gt=0)  # micro-batches per optimizer step (per rank)
    lr: float = pydantic.Field(1e-3, gt=0)
    min_lr_ratio: float = pydantic.Field(0.1, ge=0, le=1)  # cosine/linear decay floor, as a fraction of lr
    schedule: Schedule = "cosine"
    warmup_steps: int = pydantic.Field(0, ge=0)
    weight_decay: float = pydantic.Field(0.01, ge=0)
    # No weight decay on norm gains, biases, embeddings and other 1-D parameters (the usual practice).
    decay_exclude: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = pydantic.Field(1e-8, gt=0)
    clip_grad: float | None = pydantic.Field(1.0, gt=0)  # max global grad norm; None disables clipping
    precision: Precision = "fp32"  # bf16: autocast the forward pass to bfloat16
    device: str = "auto"  # auto: cuda if available, else cpu
    parallel: Parallel = "ddp"  # how a torchrun launch shards work: DDP or FSDP2 fully_shard
    eval_every: int = pydantic.Field(100, ge=0)  # 0: evaluate only at the end
    eval_batch_size: int | None = pydantic.Field(None, gt=0)  # default: batch_size
    eval_batches: int | None = pydantic.Field(None, gt=0)  # cap on evaluation batches; None: all
    early_stopping: int | None = pydantic.Field(None, gt=0)  # stop after this many evals without gain
    checkpoint_every: int = pydantic.Field(500, ge=0)  # 0: only at the end
    keep_last: int = pydantic.Field(3, gt=0)
    log_every: int = pydantic.Field(10, gt=0)
    # LM only: pack each micro-batch's sequences end to end (no pad waste); every mixer must pack.
    packed: bool = False

    @pydantic.model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; lower warmup_steps")
        return self


class DataConfig(StrictModel):
    """Which dataset to build (a name registered in efformer.train.data) and its options."""

    name: str = "text"
    options: dict[str, Any] = {}


class RunConfig(StrictModel):
    """A whole training run: model, train and data sections plus where outputs go."""

    name: str = "run"
    out_dir: str | None = None  # default: runs/<name>
    results: str = "runs/results.db"  # the SQLite results store
    model: dict[str, Any] = {}  # ModelConfig keys, optionally with "preset": a create_model preset name
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()

    def build_model_config(self) -> ModelConfig:
        """The validated ModelConfig of the model section (errors name ``model.<key>``)."""
        return resolve_model_config(self.model)

    def output_dir(self) -> Path:
        """The run folder (checkpoints, final model, run.json)."""
        return Path(self.out_dir or f"runs/{self.name}")


_UNKNOWN_KIND_KEY = {"mixer": "model.mixer", "positional": "model.positional", "norm": "model.norm",
                     "ffn": "model.ffn", "preset": "model.preset"}


def resolve_model_config(section: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a model section; a ``preset`` key supplies defaults that other keys override."""
    section = dict(section)
    preset = section.pop("preset", None)
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError("model.preset", preset, f"unknown preset; use one of {', '.join(sorted(PRESETS))}")
        base = dict(PRESETS[preset])
    try:
        return build_config({**base, **section})
    except ConfigError as e:
        field = e.field if e.field.startswith("model") else f"model.{e.field}"
        raise ConfigError(field, e.value, e.allowed) from None
    except UnknownNameError as e:
        key = _UNKNOWN_KIND_KEY.get(e.kind, f"model.{e.kind}")
        raise ConfigError(key, e.name, str(e)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("--set", text, "expected KEY.PATH=VALUE, e.g. --set train.steps=2000")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError("--set", text, "the key path has an empty part; write e.g. model.d_model=256")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, raw, f"a YAML value ({e.__class__.__name__})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.path=value`` override set (sections are created as needed)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(".".join(path), value, f"{where} is a value, not a section; cannot set a key in it")
            node = nxt
        node[path[-1]] = value
    return data


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    """The raw dict of a YAML or JSON config file (``None``: an empty config)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(p), "file not found; give the path of a YAML or JSON run config")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("config", str(p), f"a UTF-8 text file (YAML or JSON); byte {e.start} is not UTF-8") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError("config", str(p), f"valid JSON (line {e.lineno}: {e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError("config", str(p), f"valid YAML ({where}{getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(p), f"a mapping of sections (model, train, data), got {type(data).__name__}")
    return data


def build_run_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a raw dict plus overrides; model and data sections are checked too."""
    raw = apply_overrides(data or {}, overrides or [])
    try:
        cfg = RunConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise _run_config_error(e) from None
    cfg.build_model_config()

    check_data_config(cfg.data)
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a config file, apply ``--set`` overrides and validate everything."""
    return build_run_config(load_config_file(path), overrides)


def _run_config_error(e: pydantic.ValidationError) -> ConfigError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "value_error" and loc == ["train"]:  # TrainConfig's cross-field check
        return ConfigError("train.warmup_steps", err["input"].get("warmup_steps"), str(err["ctx"]["error"]))
    field = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        owner = {(): RunConfig, ("train",): TrainConfig, ("data",): DataConfig}.get(tuple(loc[:-1]))
        allowed = "unknown key" + (f"; allowed: {', '.join(owner.model_fields)}" if owner else "")
    else:
        allowed = err["msg"]
    return ConfigError(field, err.get("input"), allowed)
