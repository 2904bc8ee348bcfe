"""Datasets, batching and losses for the trainer.

A dataset is any Sequence of example dicts of 1-D/0-D tensors:
  lm:         {"input_ids": LongTensor(n)}, or with per-position targets {"input_ids", "targets": LongTensor(n)}
              (the output at t must predict targets[t]; -100 where nothing is asked: recall tasks)
  classifier: {"input_ids": LongTensor(n), "label": LongTensor()}
  dual:       {"ids1": LongTensor(n1), "ids2": LongTensor(n2), "label": LongTensor()}
The batch order is a seeded permutation per epoch, so (epoch, batch index) fixes the next batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.assets import bundled_text
from efformer.data.recall import IGNORE
from efformer.data.text import ByteTokenizer, FileTokenizer, tokenizer_file
from efformer.errors import ConfigError, DataError, UnknownNameError
from efformer.models.config import ModelConfig
from efformer.models.packing import pack_sequences, packed_pairs
from efformer.options import StrictModel, validate_options

Example = dict[str, Tensor]


# ---- batching --------------------------------------------------------------------------------
def _pad(seqs: list[Tensor], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    n = max(int(s.shape[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    keep = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s.dim() != 1:
            raise DataError(f"example {i}: token ids must be a 1-D tensor, got shape {tuple(s.shape)}")
        sl = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, sl], keep[i, sl] = s, True
    return ids, keep


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, Tensor]:
    """Stack examples into a batch padded to the longest, with bool keep-masks.

    LM batches are LEFT-padded (causal mixers expect it): {"input_ids", "mask"} (b, n).
    Classifier batches are right-padded: {"input_ids", "mask"} (b, n), {"label"} (b,).
    Dual batches: {"ids1", "mask1"} (b, n1), {"ids2", "mask2"} (b, n2), {"label"} (b,).
    """
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    keys = set(examples[0])
    if any(set(e) != keys for e in examples):
        raise DataError(f"examples in one batch have different keys: {sorted(keys)} vs others")
    out: dict[str, Tensor] = {}
    if keys == {"input_ids"} or keys == {"input_ids", "label"}:
        out["input_ids"], out["mask"] = _pad([e["input_ids"] for e in examples], pad_id, left="label" not in keys)
    elif keys == {"input_ids", "targets"}:
        out["input_ids"], out["mask"] = _pad([e["input_ids"] for e in examples], pad_id, left=True)
        out["targets"], _ = _pad([e["targets"] for e in examples], IGNORE, left=True)
    elif keys == {"images", "label"}:  # image models: equal-sized (C, H, W) images, nothing to pad
        out["images"] = torch.stack([e["images"] for e in examples])
    elif keys == {"ids1", "ids2", "label"}:
        out["ids1"], out["mask1"] = _pad([e["ids1"] for e in examples], pad_id, left=False)
        out["ids2"], out["mask2"] = _pad([e["ids2"] for e in examples], pad_id, left=False)
    else:
        raise DataError(
            f"unknown example keys {sorted(keys)}; use {{input_ids}} or {{input_ids, targets}} (lm), "
            "{input_ids, label} (classifier) "
            "or {ids1, ids2, label} (dual)"
        )
    if "label" in keys:
        out["label"] = torch.stack([e["label"].reshape(()) for e in examples]).long()
    return out


def collate_packed(examples: Sequence[Example], pad_id: int = 0) -> dict[str, Tensor]:
    """LM examples packed end to end into rows as long as the longest (see :mod:`efformer.models.packing`):
    {"input_ids", "mask", "segments"} (rows, n); the loss then never crosses a segment boundary."""
    if not examples or any(set(e) != {"input_ids"} for e in examples):
        raise DataError("packed batches take LM examples ({input_ids} only); set train.packed=false for others")
    packed = pack_sequences([e["input_ids"] for e in examples], pad_id=pad_id)
    return {"input_ids": packed.ids, "mask": packed.mask, "segments": packed.segments}


@dataclass(frozen=True)
class BatchOrder:
    """Deterministic global batches: epoch e uses a permutation seeded by (seed, e); last partial batch dropped."""

    n_examples: int
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        """Number of full global batches in one pass over the data."""
        return self.n_examples // self.batch_size

    def indices(self, epoch: int, index: int) -> Tensor:
        """Example indices (batch_size,) of global batch ``index`` of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_examples, generator=g)
        return perm[index * self.batch_size : (index + 1) * self.batch_size]


# ---- losses ----------------------------------------------------------------------------------
def task_of(model: nn.Module) -> str:
    """The task ('lm', 'classifier', 'dual') of a model, looking through DDP wrappers."""
    return getattr(model, "module", model).cfg.task


def loss_terms(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(summed loss, number of loss terms, summed metric counts) of a batch; sums make exact averages
    over micro-batches and ranks possible. Metric sums: ``correct`` (and ``count`` via the second item)."""
    task = task_of(model)
    if task == "lm" and "targets" in batch:  # per-position targets: only the asked positions count
        logits = model(batch["input_ids"], mask=batch["mask"]).float()
        target = batch["targets"]
        valid = batch["mask"] & (target != IGNORE)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        return ce, valid.sum(), {"correct": ((logits.argmax(-1) == target) & valid).sum()}
    if task == "lm":
        ids, keep, seg = batch["input_ids"], batch["mask"], batch.get("segments")
        if seg is None:
            logits = model(ids, mask=keep)[:, :-1].float()
        else:  # packed rows: the padding tail is its own segment, so a full mask needs no mask tensor
            logits = model(ids, mask=None if bool(keep.all()) else keep, segments=seg)[:, :-1].float()
        target = ids[:, 1:]
        valid = keep[:, 1:] & keep[:, :-1] if seg is None else packed_pairs(seg, keep)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        valid_f = valid.reshape(-1).to(ce.dtype)
        correct = ((logits.argmax(-1) == target) & valid).sum()
        return (ce * valid_f).sum(), valid.sum(), {"correct": correct}
    if task == "classifier":
        logits = model(batch["input_ids"], mask=batch["mask"]).float()
    elif task == "dual":
        logits = model(batch["ids1"], batch["ids2"], mask1=batch["mask1"], mask2=batch["mask2"]).float()
    elif task == "image":
        logits = model(batch["images"]).float()
    else:
        raise ConfigError("model.task", task, "one of lm, classifier, dual, image")
    label = batch["label"]
    ce = F.cross_entropy(logits, label, reduction="sum")
    correct = (logits.argmax(-1) == label).sum()
    return ce, torch.tensor(label.numel(), device=label.device), {"correct": correct}


def count_terms(batch: dict[str, Tensor]) -> Tensor:
    """Number of loss terms in a batch before any forward pass (predicted tokens, or examples)."""
    if "label" in batch:
        return torch.tensor(batch["label"].numel())
    if "targets" in batch:
        return (batch["mask"] & (batch["targets"] != IGNORE)).sum()
    keep = batch["mask"]
    if "segments" in batch:
        return packed_pairs(batch["segments"], keep).sum()
    return (keep[:, 1:] & keep[:, :-1]).sum()


def count_tokens(batch: dict[str, Tensor]) -> int:
    """Real (non-pad) tokens in a batch, for tokens/s."""
    return int(sum(int(v.sum()) for k, v in batch.items() if k.startswith("mask")))


def compute_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Mean loss of a batch and its metrics (lm: loss, ppl, accuracy; classifier/dual: loss, accuracy)."""
    total, count, sums = loss_terms(model, batch)
    loss = total / count.clamp(min=1)
    return loss, summarize(task_of(model), float(total.detach()), int(count), float(sums["correct"]))


def summarize(task: str, loss_sum: float, count: int, correct: float) -> dict[str, float]:
    """Metrics from summed terms: loss, accuracy, and perplexity for language models."""
    count = max(count, 1)
    loss = loss_sum / count
    out = {"loss": loss, "accuracy": correct / count}
    if task == "lm":
        out["ppl"] = math.exp(min(loss, 50.0))
    return out


# ---- built-in datasets -----------------------------------------------------------------------
Builder = Callable[[Any, ModelConfig], tuple[Sequence[Example], Sequence[Example]]]
DATASETS: dict[str, tuple[type[pydantic.BaseModel], Builder]] = {}


def register_dataset(name: str, options: type[pydantic.BaseModel]) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(options, model_cfg) -> (train, eval)`` under ``name`` for configs."""
    def deco(fn: Builder) -> Builder:
        DATASETS[name] = (options, fn)
        return fn

    return deco


def check_data_config(data) -> Any:
    """Validate a DataConfig's name and options; returns the options model (errors name data.*)."""
    if data.name not in DATASETS:
        raise ConfigError("data.name", data.name, str(UnknownNameError("dataset", data.name, DATASETS)))
    opts_model, _ = DATASETS[data.name]
    return validate_options(opts_model, data.options, "data.options")


def build_datasets(data, model_cfg: ModelConfig) -> tuple[Sequence[Example], Sequence[Example]]:
    """(train, eval) datasets of a DataConfig for a model config."""
    opts = check_data_config(data)
    return DATASETS[data.name][1](opts, model_cfg)


class TensorExamples(Sequence):
    """Fixed-length LM examples: rows of a (count, n) LongTensor as {"input_ids": (n,)}."""

    def __init__(self, rows: Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> Example:
        return {"input_ids": self.rows[i]}


class TextOptions(StrictModel):
    """LM on a text file (default: the small corpus bundled with efformer), as bytes or through a tokenizer."""

    path: str | None = None  # UTF-8 / byte file; None uses the bundled corpus
    seq_len: int = pydantic.Field(64, gt=1)
    stride: int | None = pydantic.Field(None, gt=0)  # window step; default seq_len // 4
    eval_fraction: float = pydantic.Field(0.1, gt=0, lt=1)  # tail of the file held out
    # a tokenizer.json (or a folder holding one: a Hugging Face model folder, `efformer tokenizer train --out`);
    # None: raw bytes. The trained model's folder gets a copy, so generate decodes with it.
    tokenizer: str | None = None


def token_windows(ids: Tensor, seq_len: int, stride: int, eval_fraction: float, source: str,
                  ) -> tuple[TensorExamples, TensorExamples]:
    """Windows of ``seq_len`` ids every ``stride`` over the head (train) and the ``eval_fraction`` tail (eval)
    of the 1-D ``ids``; ``source`` names the text in errors."""
    split = int(len(ids) * (1 - eval_fraction))

    def windows(t: Tensor) -> Tensor:
        if len(t) < seq_len:
            raise DataError(f"{source}: a split has {len(t)} tokens, fewer than seq_len={seq_len}; use a longer "
                            "text or a smaller seq_len")
        return t.unfold(0, seq_len, stride)

    return TensorExamples(windows(ids[:split])), TensorExamples(windows(ids[split:]))


def encode_text(raw: bytes, tokenizer: ByteTokenizer | FileTokenizer, vocab_size: int, source: str) -> Tensor:
    """Token ids (n,) of the bytes ``raw`` (UTF-8 text unless byte-level) for a model of ``vocab_size`` ids."""
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", vocab_size, f">= {tokenizer.vocab_size}, the size of the text's "
                          "vocabulary (bytes, or the tokenizer's)")
    if isinstance(tokenizer, ByteTokenizer):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not UTF-8 text (bad byte at offset {e.start}); a tokenizer reads text") from None
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


@register_dataset("text", TextOptions)
def text_dataset(opts: TextOptions, model_cfg: ModelConfig):
    """Overlapping windows of the head (train) and tail (eval) of a text file, as bytes or tokenizer ids."""
    if opts.path is None:
        raw = bundled_text()
    else:
        p = Path(opts.path)
        if not p.is_file():
            raise ConfigError("data.options.path", opts.path, "file not found; give an existing text file or "
                              "leave it unset to use the bundled corpus")
        raw = p.read_bytes()
    tok = ByteTokenizer() if opts.tokenizer is None else \
        FileTokenizer(tokenizer_file(opts.tokenizer, "data.options.tokenizer"))
    source = opts.path or "bundled corpus"
    ids = encode_text(raw, tok, model_cfg.vocab_size, source)
    return token_windows(ids, opts.seq_len, opts.stride or max(1, opts.seq_len // 4), opts.eval_fraction, source)


class CopyOptions(StrictModel):
    """Synthetic copy task: k random symbols, a separator, then the same k symbols again."""

    length: int = pydantic.Field(8, gt=0)  # k
    symbols: int = pydantic.Field(16, gt=1)  # symbols are ids 1..symbols; separator symbols+1; 0 is pad
    n_train: int = pydantic.Field(2048, gt=0)
    n_eval: int = pydantic.Field(256, gt=0)
    seed: int = 0


@register_dataset("copy", CopyOptions)
def copy_dataset(opts: CopyOptions, model_cfg: ModelConfig):
    """(train, eval) copy-task sequences of length 2k+1; the second half is predictable only by copying."""
    if model_cfg.vocab_size < opts.symbols + 2:
        raise ConfigError("model.vocab_size", model_cfg.vocab_size, f"the copy task needs >= {opts.symbols + 2}")
    g = torch.Generator().manual_seed(opts.seed)

    def make(n: int) -> TensorExamples:
        x = torch.randint(1, opts.symbols + 1, (n, opts.length), generator=g)
        sep = torch.full((n, 1), opts.symbols + 1, dtype=torch.long)
        return TensorExamples(torch.cat([x, sep, x], dim=1))

    return make(opts.n_train), make(opts.n_eval)
