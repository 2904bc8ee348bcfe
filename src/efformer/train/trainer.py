"""The trainer: AdamW + schedule, clipping, accumulation, bf16 autocast, periodic evaluation, early
stopping, atomic checkpoints with exact resume, DDP/FSDP2 under torchrun, results-store logging.

Exactness: the batch order is a function of (seed, epoch, batch index), the learning rate a function
of the step, and checkpoints hold the model, the optimizer moments and the RNG states, so a resumed
run repeats the uninterrupted one bit for bit. Losses are sums divided by the global count of loss
terms, so N ranks x M micro-batches give the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efformer.errors import CheckpointError, ConfigError, EfformerError
from efformer.models import create_model, save
from efformer.models.early_exit import exit_loss_terms
from efformer.models.elastic import step_widths, use_widths
from efformer.nn.aux import collect_aux_losses
from efformer.options import validate_options
from efformer.registry import NORMS
from efformer.results import ResultsStore
from efformer.train import distributed as D
from efformer.train.checkpoint import (
    flatten_optimizer,
    list_checkpoints,
    load_checkpoint,
    model_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer,
)
from efformer.train.config import TrainConfig
from efformer.train.data import BatchOrder, collate, collate_packed, count_terms, count_tokens, loss_terms, summarize
from efformer.train.progress import Progress
from efformer.train.schedules import lr_at


class DivergedError(EfformerError):
    """The loss or gradient norm became NaN/inf; the run stopped before applying the update."""


def _norm_types() -> tuple[type, ...]:
    return tuple(NORMS.get(n) for n in NORMS.names()) + (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def param_groups(model: nn.Module, weight_decay: float, exclude: bool) -> list[dict[str, Any]]:
    """AdamW groups: with ``exclude``, norms, biases, embeddings and 1-D parameters get no decay."""
    if not exclude:
        return _split_lr_scale([{"params": [p for p in model.parameters() if p.requires_grad],
                                 "weight_decay": weight_decay}])
    norms = _norm_types()
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norms + (nn.Embedding,)) or name.endswith("bias") or p.dim() < 2:
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) parameters appear once
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    return _split_lr_scale(groups)


def _split_lr_scale(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups split further by a parameter's ``lr_scale`` attribute (e.g. MoE experts), kept as a group key."""
    out = []
    for g in groups:
        scales = sorted({getattr(p, "lr_scale", 1.0) for p in g["params"]})
        out += [{**g, "params": [p for p in g["params"] if getattr(p, "lr_scale", 1.0) == s],
                 **({"lr_scale": s} if s != 1.0 else {})} for s in scales or [1.0]]
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the model's parameters, grouped by :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_exclude), lr=cfg.lr,
                             betas=cfg.betas, eps=cfg.eps)


class Trainer:
    """Trains ``model`` on ``train_data`` (a Sequence of example dicts) as ``train_config`` says."""

    def __init__(self, model: nn.Module, train_config: TrainConfig | dict, train_data: Sequence,
                 eval_data: Sequence | None = None, store: ResultsStore | None = None, run_id: str | None = None,
                 out_dir: str | Path = "runs/run", run_config: dict | None = None, progress_stream=None,
                 kind: str = "train", on_step: Callable[[int, int, float], None] | None = None,
                 loss_fn: Callable[[nn.Module, dict], tuple] = loss_terms, model_files: dict[str, bytes] | None = None):

        self.cfg = validate_options(TrainConfig, train_config, "train")
        self.info = D.setup(self.cfg.device)
        self.train_data, self.eval_data = train_data, eval_data
        self.store, self.out_dir = store, Path(out_dir)
        self.run_id = run_id or f"{self.out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.raw = model.to(self.info.device)
        self.task = self.raw.cfg.task
        self.pad_id = getattr(self.raw.cfg, "pad_id", 0)  # (image models have no token ids to pad)
        self.run_config = run_config or {"model": self.raw.cfg.model_dump(), "train": self.cfg.model_dump()}
        self.progress_stream = progress_stream
        self.on_step = on_step  # called as on_step(step, total_steps, loss) after every step, on rank 0
        self.kind = kind  # the run's kind in the results store ("train", "arena", ...)
        # the training loss, as loss_terms: (summed loss, loss terms, {"correct"}) (distillation: KL to a teacher)
        self.loss_fn = loss_fn
        self.model_files = model_files  # extra files for the saved model folder (its tokenizer.json)
        per_rank, rem = divmod(self.cfg.batch_size, self.info.world_size * self.cfg.grad_accum)
        if rem or per_rank == 0:
            raise ConfigError("train.batch_size", self.cfg.batch_size,
                              f"must be a positive multiple of world_size x grad_accum = "
                              f"{self.info.world_size} x {self.cfg.grad_accum}")
        self.micro = per_rank
        self.order = BatchOrder(len(train_data), self.cfg.batch_size, self.cfg.seed)
        if self.order.batches_per_epoch == 0:
            raise ConfigError("train.batch_size", self.cfg.batch_size,
                              f"larger than the training set ({len(train_data)} examples); lower it")
        torch.manual_seed(self.cfg.seed)  # dropout and anything else drawn during training
        self.model = D.wrap(self.raw, self.info, self.cfg.parallel)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.step = self.epoch = self.batch_index = 0
        self.best: float | None = None
        self.bad_evals = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed from
        # per-step train metrics of this process's run (the store keeps the full curve)
        self.history: deque[dict[str, float]] = deque(maxlen=100_000)

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        """Where checkpoints go."""
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank joins the state gathering)."""
        # with cpu_offload the full state lands on rank 0 only; the other ranks get empty dicts
        weights = D.full_model_state(self.model)
        optim_state = D.full_optimizer_state(self.model, self.optimizer)
        path = None
        if self.info.is_main:
            optim_tensors, optim_meta = flatten_optimizer(optim_state)
            rng_tensors, rng_meta = rng_state()
            tensors = {**{f"model/{k}": v for k, v in weights.items()}, **optim_tensors, **rng_tensors}
            meta = {"optim": optim_meta, "rng": rng_meta, "run_id": self.run_id,
                    "position": {"epoch": self.epoch, "batch_index": self.batch_index},
                    "early_stopping": {"best": self.best, "bad_evals": self.bad_evals},
                    "model_config": self.raw.cfg.model_dump(), "run_config": self.run_config}
            path = save_checkpoint(self.ckpt_dir, self.step, tensors, meta, self.cfg.keep_last)
        self.saved_step = self.step
        D.barrier()
        return path

    def save_model(self, directory: str | Path) -> None:
        """Save the trained model as a plain efformer model folder (gathered from shards under FSDP)."""
        model = self.raw
        if self.cfg.parallel == "fsdp" and self.info.distributed:
            weights = D.full_model_state(self.model)  # collective: every rank takes part
            if self.info.is_main:
                model = create_model(self.raw.cfg)
                model.load_state_dict(weights)
        if self.info.is_main:
            save(model, directory, self.model_files)
        D.barrier()

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` (or the latest checkpoint of the run folder); False if there is none."""
        if path is None and not list_checkpoints(self.ckpt_dir):
            return False
        tensors, meta = load_checkpoint(path or self.ckpt_dir)
        if meta["model_config"] != self.raw.cfg.model_dump():
            raise CheckpointError(f"checkpoint step {meta['step']} was made with a different model config; "
                                  "resume with the config it was trained with")
        if meta["step"] > self.cfg.steps:
            raise CheckpointError(f"checkpoint is at step {meta['step']} but train.steps={self.cfg.steps}")
        optim = unflatten_optimizer(tensors, meta["optim"])
        D.load_full_state(self.model, self.optimizer, model_tensors(tensors), optim)
        set_rng_state(tensors, meta["rng"])
        self.step, self.run_id = meta["step"], meta["run_id"]
        self.epoch, self.batch_index = meta["position"]["epoch"], meta["position"]["batch_index"]
        self.best, self.bad_evals = meta["early_stopping"]["best"], meta["early_stopping"]["bad_evals"]
        self.saved_step = self.step
        return True

    # ---- one optimizer step ------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        idx = self.order.indices(self.epoch, self.batch_index)
        per_rank = self.micro * self.cfg.grad_accum
        mine = idx[self.info.rank * per_rank : (self.info.rank + 1) * per_rank].tolist()
        join = collate_packed if self.cfg.packed else collate
        return [join([self.train_data[i] for i in mine[j * self.micro : (j + 1) * self.micro]], self.pad_id)
                for j in range(self.cfg.grad_accum)]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch; returns its global loss, accuracy, lr, tokens."""
        self.model.train()
        batches = self._micro_batches()
        local_count = sum(count_terms(b) for b in batches)
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, terms, tokens
        stats[2], stats[3] = float(local_count), float(sum(count_tokens(b) for b in batches))
        global_count = D.all_reduce_sum(stats[2:3].to(self.info.device))[0].item()
        # DDP and FSDP average gradients over ranks; multiplying by world size turns that into a sum.
        scale = self.info.world_size / max(global_count, 1.0)
        aux_sums: dict[str, float] = {}
        settings = step_widths(self.raw, self.step)  # MatFormer: the loss summed over granularities
        passes = [(j, s, batch, w) for j, batch in enumerate(batches) for s, w in enumerate(settings)]
        for j, s, batch, widths in passes:  # one pass per micro-batch (the full model) unless elastic
            last = j == len(batches) - 1 and s == len(settings) - 1
            sync = last or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else self.model.no_sync(), self._autocast(),
                  use_widths(self.raw, widths)):
                on_device = self._to_device(batch)
                total, _, sums = self.loss_fn(self.model, on_device)
                exit_total = exit_loss_terms(self.raw, on_device)  # early-exit heads: sums like the task loss
            # auxiliary losses (MoE balance, ...) are means over a micro-batch: weight each by its loss terms
            aux = collect_aux_losses(self.raw)
            terms = float(count_terms(batch))
            for name, value in aux.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + float(value.detach()) * terms
            if getattr(self.raw.cfg, "exit_layers", None):  # image models (VisionConfig) have no exits
                aux_sums["exit"] = aux_sums.get("exit", 0.0) + float(exit_total.detach())
            ((total + exit_total + (sum(aux.values()) * terms if aux else 0.0)) * scale).backward()
            if s == 0:  # the logged loss and accuracy are the full model's
                stats[0] += total.detach().double().item()
                stats[1] += float(sums["correct"])
        stats = D.all_reduce_sum(stats.to(self.info.device)).cpu()
        metrics = summarize(self.task, stats[0].item(), int(stats[2].item()), stats[1].item())
        grad_norm = None
        if self.cfg.clip_grad is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad))
        if not math.isfinite(metrics["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss {metrics['loss']}" if not math.isfinite(metrics["loss"]) else f"gradient norm {grad_norm}"
            last = list_checkpoints(self.ckpt_dir)
            raise DivergedError(
                f"{what} at step {self.step + 1} (epoch {self.epoch}, batch {self.batch_index}); the run stopped "
                f"without applying the update. Last good checkpoint: {last[-1] if last else 'none'}. Lower "
                "train.lr, set train.clip_grad, add warmup or use train.precision=fp32, then resume or restart."
            )
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_index += 1
        if self.batch_index == self.order.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        out = {**metrics, "lr": lr, "tokens": stats[3].item()}
        out.update({f"aux_{k}": v / max(float(local_count), 1.0) for k, v in aux_sums.items()})  # this rank's
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Sequence | None = None, max_batches: int | None = None) -> dict[str, float]:
        """Task metrics on ``data`` (default: the eval set) in fixed order, sharded over ranks."""
        data = self.eval_data if data is None else data
        if data is None or len(data) == 0:
            return {}
        self.model.eval()
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        n_batches = math.ceil(len(data) / bs)
        if max_batches is None:
            max_batches = self.cfg.eval_batches
        n_batches = min(n_batches, max_batches) if max_batches else n_batches
        # FSDP forwards are collective, so every rank runs every batch; DDP ranks split the batches.
        fsdp = self.cfg.parallel == "fsdp" and self.info.distributed
        first, every = (0, 1) if fsdp else (self.info.rank, self.info.world_size)
        stats = torch.zeros(3, dtype=torch.float64)
        for b in range(first, n_batches, every):
            batch = collate([data[i] for i in range(b * bs, min((b + 1) * bs, len(data)))], self.pad_id)
            with self._autocast():
                total, count, sums = loss_terms(self.model if fsdp else self.raw, self._to_device(batch))
            stats += torch.tensor([total.item(), float(sums["correct"]), float(count)], dtype=torch.float64)
        if not fsdp:
            stats = D.all_reduce_sum(stats.to(self.info.device)).cpu()
        self.model.train()
        return summarize(self.task, stats[0].item(), int(stats[2].item()), stats[1].item())

    def _improved(self, metrics: dict[str, float]) -> bool:
        """Update the early-stopping record; lm: lower loss is better, classifiers: higher accuracy."""
        value = metrics["loss"] if self.task == "lm" else metrics["accuracy"]
        better = self.best is None or (value < self.best if self.task == "lm" else value > self.best)
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return better

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to ``train.steps`` (or early stop); returns the final train and eval metrics."""
        main, cfg = self.info.is_main, self.cfg
        if main and self.store is not None:
            self.store.start_run(self.run_id, self.kind, self.run_config, name=self.out_dir.name,
                                 device=str(self.info.device))
        progress = Progress(cfg.steps, self.step, enabled=main, log_every=cfg.log_every, stream=self.progress_stream)
        status, last, window = "done", {}, []
        try:
            while self.step < cfg.steps:
                last = self.train_step()
                self.history.append({"step": self.step, **last})
                progress.update(self.step, last["loss"], last["lr"], int(last["tokens"]))
                if main and self.on_step is not None:
                    self.on_step(self.step, cfg.steps, last["loss"])
                window.append(last["loss"])
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log_train(window, last)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    ev = self.evaluate()
                    if ev:
                        improved = self._improved(ev)
                        self._log_eval(ev, progress)
                        if cfg.early_stopping and not improved and self.bad_evals >= cfg.early_stopping:
                            progress.write(f"early stopping at step {self.step}: no gain in {self.bad_evals} evals")
                            status = "early_stopped"
                            break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        except DivergedError as e:
            self._log_train(window, last)
            if main and self.store is not None:
                self.store.finish_run(self.run_id, "diverged")
            progress.write(f"efformer: {e}")
            progress.close()
            raise
        except BaseException:
            if main and self.store is not None:
                self.store.finish_run(self.run_id, "failed")
            progress.close()
            raise
        self._log_train(window, last)
        final = {"step": float(self.step), **{f"train_{k}": v for k, v in last.items() if k != "tokens"}}
        ev = self.evaluate()
        if ev:
            self._improved(ev)
            self._log_eval(ev, progress)
            final.update({f"eval_{k}": v for k, v in ev.items()})
        final["tokens_per_s"] = progress.tokens_per_s()
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.save_model(self.out_dir / "model")
        if main and self.store is not None:
            self.store.log_metrics(self.run_id, self.step, {"tokens_per_s": final["tokens_per_s"]})
            self.store.finish_run(self.run_id, status)
        progress.close()
        return final

    def _log_train(self, window: list[float], last: dict[str, float]) -> None:
        """One metrics row per ``log_every`` steps: the window's mean loss, the current lr and grad norm."""
        if window and self.info.is_main and self.store is not None:
            values = {"loss": sum(window) / len(window), "lr": last["lr"]}
            if "grad_norm" in last:
                values["grad_norm"] = last["grad_norm"]
            values.update({k: v for k, v in last.items() if k.startswith("aux_")})
            self.store.log_metrics(self.run_id, self.step, values)
        window.clear()

    def _log_eval(self, metrics: dict[str, float], progress: Progress) -> None:
        progress.write(f"eval step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.info.is_main and self.store is not None:
            self.store.log_eval(self.run_id, "eval", metrics, step=self.step)
            self.store.log_metrics(self.run_id, self.step, {f"eval_{k}": v for k, v in metrics.items()})
