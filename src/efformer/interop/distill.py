"""Distilling a converted model from the model it was converted from: ``convert`` swaps the attention of
chosen layers for another mixer, then the student is trained to match the teacher on the user's text
through the efformer trainer (progress, atomic checkpoints, exact resume).

The loss is knowledge distillation ("Distilling the Knowledge in a Neural Network", Hinton et al.) on the
next-token distributions, plus optionally the attention-transfer term of linearising conversions
("Finetuning Pretrained Transformers into RNNs", Kasai et al.; "LoLCATs: On Low-Rank Linearizing of Large
Language Models", Zhang et al.): the mean squared error between the student's and the teacher's mixer
output in every converted layer. Per scored position t (t and t + 1 both real tokens, as the LM loss),
with teacher logits z_t, student logits s_t, temperature T and mixer outputs a_{l,t} (d_model wide):

    L_t = T^2 KL(softmax(z_t / T) || softmax(s_t / T)) + hidden_weight * sum_l mean_d (a^S_{l,t} - a^T_{l,t})^2

averaged over every scored position of the global batch. The teacher is never updated; by default only
the converted layers' mixer parameters are trained (``train_all=True``: every parameter), without
weight decay, so a conversion that is already exact stays exactly where it is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.data.text import TOKENIZER_FILE, ByteTokenizer, FileTokenizer, tokenizer_file
from efformer.errors import ConfigError, DataError
from efformer.interop.convert import Conversion, convert
from efformer.options import StrictModel, validate_options
from efformer.train.checkpoint import list_checkpoints
from efformer.train.config import TrainConfig
from efformer.train.data import collate, encode_text, loss_terms, token_windows
from efformer.train.trainer import Trainer

# Trainer settings distillation starts from (a user's ``train`` dict overrides them): no weight decay (it
# would pull converted weights away from a teacher they already match), evaluation only at the end.
TRAIN_DEFAULTS: dict[str, Any] = {"steps": 200, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0,
                                  "eval_every": 0, "checkpoint_every": 0, "log_every": 10}


class DistillOptions(StrictModel):
    """What to convert and how to score the student against the teacher."""

    mixer: str = pydantic.Field(description="the linear-time (or any) mixer the chosen layers become")
    layers: list[int] | None = pydantic.Field(None, description="layer indices to convert; None: every layer")
    options: dict[str, Any] = pydantic.Field({}, description="options of the new mixer (as in convert)")
    train_all: bool = pydantic.Field(False, description="train every parameter, not only the converted mixers")
    temperature: float = pydantic.Field(1.0, gt=0, description="softmax temperature T of the KL term")
    hidden_weight: float = pydantic.Field(0.0, ge=0, description="weight of the per-layer mixer-output MSE")
    seq_len: int = pydantic.Field(128, gt=1, description="tokens per training window")
    stride: int | None = pydantic.Field(None, gt=0, description="window step; None: seq_len (no overlap)")
    eval_fraction: float = pydantic.Field(0.1, gt=0, lt=1, description="tail of the text held out for the KL")


def soft_kl_reference(s: Tensor, log_p: Tensor, t: float) -> Tensor:
    """T^2 KL(p || softmax(s / T)) per row of student logits ``s`` (..., V) and teacher log-probs ``log_p``,
    as written (autograd's gradient)."""
    log_q = F.log_softmax(s / t, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)


class SoftKL(torch.autograd.Function):
    """``soft_kl_reference`` with its gradient in closed form, T (softmax(s / T) - p), which is exactly zero
    when the student already equals the teacher (autograd's leaves p (sum(p) - 1), a rounding residue that
    Adam's normalisation turns into full-size steps)."""

    @staticmethod
    def forward(ctx, s: Tensor, log_p: Tensor, t: float) -> Tensor:
        """(..., V) student logits, (..., V) teacher log-probs -> (...) T^2 KL."""
        log_q = F.log_softmax(s / t, -1)
        p = log_p.exp()
        ctx.save_for_backward(p, log_q)
        ctx.t = t
        return (p * (log_p - log_q)).sum(-1) * (t * t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        """Gradient for ``s`` only (the teacher is fixed)."""
        p, log_q = ctx.saved_tensors
        return grad[..., None] * ctx.t * (log_q.exp() - p), None, None


class DistillLoss:
    """A trainer loss (as ``loss_terms``): summed distillation loss over scored positions, their count, and
    ``correct`` = positions where the student's top token is the teacher's."""

    def __init__(self, teacher: nn.Module, layers: Sequence[int], temperature: float = 1.0,
                 hidden_weight: float = 0.0):
        self.teacher, self.layers = teacher, list(layers)
        self.temperature, self.hidden_weight = temperature, hidden_weight

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(summed loss, scored positions, {"correct"}) of an LM batch {"input_ids", "mask"} (b, n)."""
        student = getattr(model, "module", model)  # through DDP
        ids, keep = batch["input_ids"], batch["mask"]
        outs: dict[tuple[str, int], Tensor] = {}
        hooks = []
        if self.hidden_weight:
            for who, net in (("t", self.teacher), ("s", student)):
                for i in self.layers:
                    hooks.append(net.backbone.blocks[i].mixer.register_forward_hook(
                        lambda mod, args, out, key=(who, i): outs.__setitem__(key, out[0])))
        try:
            self.teacher.eval()
            with torch.no_grad():
                z = self.teacher(ids, mask=keep)[:, :-1].float()
            s = model(ids, mask=keep)[:, :-1].float()
        finally:
            for h in hooks:
                h.remove()
        valid = keep[:, 1:] & keep[:, :-1]
        t = self.temperature
        per_pos = SoftKL.apply(s, F.log_softmax(z / t, -1), t)  # (b, n - 1)
        for i in self.layers if self.hidden_weight else ():
            diff = (outs[("s", i)] - outs[("t", i)].detach()).float()[:, :-1]
            per_pos = per_pos + self.hidden_weight * diff.pow(2).mean(-1)
        total = per_pos.masked_fill(~valid, 0.0).sum()
        correct = ((s.argmax(-1) == z.argmax(-1)) & valid).sum()
        return total, valid.sum(), {"correct": correct}


@torch.no_grad()
def _heldout(loss_fn, model: nn.Module, data: Sequence, batch_size: int, max_batches: int | None) -> float:
    """Mean of a ``loss_terms``-style ``loss_fn`` of ``model`` over the LM examples ``data`` (the first
    ``max_batches`` batches; None: all), in order."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    end = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    for start in range(0, end, batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, end))])
        s, c, _ = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(s), count + float(c)
    model.train(was)
    return total / max(count, 1.0)


def heldout_kl(teacher: nn.Module, student: nn.Module, data: Sequence, batch_size: int = 8,
               max_batches: int | None = None) -> float:
    """Mean KL(teacher || student) of the next-token distributions (T = 1) over the LM examples ``data``."""
    return _heldout(DistillLoss(teacher, []), student, data, batch_size, max_batches)


def heldout_ppl(model: nn.Module, data: Sequence, batch_size: int = 8, max_batches: int | None = None) -> float:
    """Perplexity (exp of the mean next-token cross-entropy) of ``model`` over the LM examples ``data``."""
    return math.exp(_heldout(loss_terms, model, data, batch_size, max_batches))


@dataclass
class Distilled:
    """What ``distill`` returns: the trained student, the conversion report, and the held-out figures
    (``kl_before``/``kl_after``: mean KL to the teacher; ``teacher_ppl``/``student_ppl``), and the trainer's
    final metrics (``train_loss`` is the distillation loss, ``train_accuracy`` the top-1 agreement; ``eval_*``
    are next-token cross-entropy figures on the held-out tail)."""

    student: nn.Module
    conversion: Conversion
    metrics: dict[str, float]


def text_examples(texts: Sequence[str | os.PathLike], tokenizer: ByteTokenizer | FileTokenizer, vocab_size: int,
                  seq_len: int, stride: int, eval_fraction: float):
    """(train, held-out) LM windows of the concatenated files ``texts``; each must be readable text."""
    if isinstance(texts, str | os.PathLike) or not texts:
        raise ConfigError("--text", texts, "a list of one or more UTF-8 text files")
    raw = []
    for f in texts:
        p = Path(f)
        if not p.is_file():
            raise DataError(f"{p} is not a file; give UTF-8 text files to distil on (--text)")
        raw.append(p.read_bytes())
    ids = encode_text(b"\n".join(raw), tokenizer, vocab_size, ", ".join(str(t) for t in texts))
    return token_windows(ids, seq_len, stride, eval_fraction, "the --text files")


def distill(teacher: nn.Module, texts: Sequence[str | os.PathLike], mixer: str, *, steps: int | None = None,
            out_dir: str | os.PathLike = "runs/distill", tokenizer: str | os.PathLike | None = None,
            train: TrainConfig | dict | None = None, resume: bool = False, progress_stream=None,
            **settings: Any) -> Distilled:
    """Convert ``teacher``'s layers to ``mixer`` and distil the copy from ``teacher`` on the files ``texts``.

    ``settings`` are :class:`DistillOptions` fields (layers, options, train_all, temperature, hidden_weight,
    seq_len, stride, eval_fraction); ``train`` overrides :data:`TRAIN_DEFAULTS` (``steps`` wins over both).
    ``tokenizer``: a ``tokenizer.json`` or a folder with one (None: bytes). Writes ``out_dir/checkpoints``
    and the student folder ``out_dir/model`` (with the tokenizer); every input is checked before anything
    is written. ``resume``: continue from the run's latest checkpoint.
    """
    if getattr(getattr(teacher, "cfg", None), "task", None) != "lm":
        raise ConfigError("teacher", type(teacher).__name__, "an efformer causal LM (create_model, load, from_hf of a "
                          "decoder); distillation matches next-token distributions")
    opts = validate_options(DistillOptions, {"mixer": mixer, **settings}, "distill")
    base = train.model_dump() if isinstance(train, TrainConfig) else dict(train or {})
    cfg = validate_options(TrainConfig, {**TRAIN_DEFAULTS, **base, **({} if steps is None else {"steps": steps})},
                           "train")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "is a file; give a folder for the distillation run")
    if not resume and list_checkpoints(out / "checkpoints"):
        raise ConfigError("--out", str(out), "already holds a run's checkpoints; pass --resume to continue it "
                          "or choose a new folder")
    tok_path = None if tokenizer is None else tokenizer_file(tokenizer, "tokenizer")
    tok = ByteTokenizer() if tok_path is None else FileTokenizer(tok_path)
    train_data, held = text_examples(texts, tok, teacher.cfg.vocab_size, opts.seq_len, opts.stride or opts.seq_len,
                                     opts.eval_fraction)
    torch.manual_seed(cfg.seed)  # the new mixers' initialisation: the same every run (and on every rank)
    student, report = convert(teacher, opts.mixer, opts.layers, opts.options)
    for name, p in student.named_parameters():
        p.requires_grad_(opts.train_all or any(name.startswith(f"backbone.blocks.{i}.mixer.") for i in report.layers))
    loss = DistillLoss(teacher, report.layers, opts.temperature, opts.hidden_weight)
    files = {TOKENIZER_FILE: tok_path.read_bytes()} if tok_path is not None else None
    trainer = Trainer(student, cfg, train_data, held, out_dir=out, progress_stream=progress_stream, kind="distill",
                      run_config={"model": student.cfg.model_dump(), "train": cfg.model_dump(),
                                  "distill": opts.model_dump()}, loss_fn=loss, model_files=files)
    teacher.to(trainer.info.device)
    at = {"batch_size": cfg.eval_batch_size or cfg.batch_size, "max_batches": cfg.eval_batches}
    kl_before = heldout_kl(teacher, student, held, **at)
    if resume and trainer.resume() and progress_stream is not None:
        print(f"resumed from step {trainer.step}", file=progress_stream, flush=True)
    final = trainer.fit()
    metrics = {"kl_before": kl_before, "kl_after": heldout_kl(teacher, student, held, **at),
               "teacher_ppl": heldout_ppl(teacher, held, **at), "student_ppl": heldout_ppl(student, held, **at),
               **final}
    return Distilled(student, report, metrics)
