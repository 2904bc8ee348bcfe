"""Early exit: heads after chosen layers (config ``exit_layers``), trained jointly with the final head
(the trainer adds :func:`exit_loss_terms`), and exit at inference when a head is confident enough.

Classifiers ("LGViT: Dynamic Early Exiting for Accelerating Vision Transformer" trains one head per
exit) stop a row at the first exit whose top class probability exceeds ``threshold``; the batch stops
once every row has exited. LGViT's second stage, self-distillation, is config ``exit_distill_weight``
(each exit also pays temperature^2 * KL from the final head's detached distribution) together with
:func:`freeze_for_exit_distillation`, which leaves only the exit heads trainable. LGViT's
heterogeneous (local-perception / global-aggregation) exit heads are not built: exits are the
classifier's own head design.

Language models follow "Confident Adaptive Language Modeling" (CALM): exits share the final norm
and the output head; prefill runs the full depth; each decoded token stops at the first exit where
every row's top next-token probability exceeds ``threshold``. The layers it skips still need that
token's keys and values for later tokens: CALM copies the exit layer's hidden state up to them, and
so does :func:`generate_with_exit` — each skipped layer's mixer runs once on the exit hidden state
to extend its cache (its output and its FFN are skipped). A threshold >= 1 never exits: the full model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.models.depth import MoDBlock


class _Exited(Exception):
    """Raised from an exit layer's hook when the whole batch is confident: stops the forward there."""

    def __init__(self, layer: int, hidden: Tensor, logits: Tensor, positions):
        super().__init__(layer)
        self.layer, self.hidden, self.logits, self.positions = layer, hidden, logits, positions


def _exits(model: nn.Module) -> list[int]:
    exits = model.cfg.exit_layers
    if not exits:
        raise ConfigError("exit_layers", exits, "a list of layer indices with exit heads, e.g. [0, 1]")
    return exits


def lm_exit_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """Next-token logits (b, n, vocab) of an exit's hidden states (b, n, d): the final norm and head."""
    h = model.backbone.final_norm(hidden)
    return h @ model.backbone.embed.weight.t() if model.cfg.tie_embeddings else model.lm_head(h)


def classifier_exit_logits(model: nn.Module, k: int, hidden: Tensor) -> Tensor:
    """Class logits (b, c) of exit ``k`` from its layer's hidden states (b, n, d)."""
    return model.exit_heads[k](model.pool(model.backbone.final_norm(hidden), model.pool_mask))


def exit_loss_terms(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed cross-entropy of every exit head on the batch the model has just run (weighted by
    ``exit_loss_weight``), plus ``exit_distill_weight`` * T^2 * KL(final head || exit) per term when set;
    0 for a model without exits. Same terms as the final head's loss."""
    exits = getattr(model.cfg, "exit_layers", None) or []  # image models (VisionConfig) have no exits
    if not exits:
        return torch.zeros((), device=next(model.parameters()).device)
    hidden, cfg = model.backbone.exit_hidden, model.cfg
    total = torch.zeros((), device=next(model.parameters()).device)
    teacher = None
    if cfg.exit_distill_weight:  # the final head's distribution, detached: exits learn from it, not it from them
        with torch.no_grad():
            teacher = _final_logits(model, hidden[cfg.n_layers - 1]).float() / cfg.exit_distill_temperature
    for k, layer in enumerate(exits):
        if cfg.task == "lm":
            ids, keep = batch["input_ids"], batch["mask"]
            logits = lm_exit_logits(model, hidden[layer])[:, :-1].float()
            terms = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            weight = (keep[:, 1:] & keep[:, :-1]).reshape(-1).to(terms.dtype)
        else:
            logits = classifier_exit_logits(model, k, hidden[layer]).float()
            terms, weight = F.cross_entropy(logits, batch["label"], reduction="none"), None
        loss = cfg.exit_loss_weight * terms
        if teacher is not None:
            t = cfg.exit_distill_temperature
            student = F.log_softmax(logits / t, -1).reshape(terms.shape[0], -1)
            kl = F.kl_div(student, F.log_softmax(teacher.reshape(student.shape), -1), log_target=True,
                          reduction="none").sum(-1)
            loss = loss + cfg.exit_distill_weight * t * t * kl
        total = total + (loss * weight if weight is not None else loss).sum()
    return total


def _final_logits(model: nn.Module, last: Tensor) -> Tensor:
    """The model's own output logits from its last layer's hidden states (the LM: without the last position)."""
    if model.cfg.task == "lm":
        return lm_exit_logits(model, last)[:, :-1]
    return model.head(model.pool(model.backbone.final_norm(last), model.pool_mask))


def freeze_for_exit_distillation(model: nn.Module) -> nn.Module:
    """LGViT's second stage: every parameter frozen but the exit heads' (train with exit_distill_weight > 0)."""
    heads = getattr(model, "exit_heads", None)
    if heads is None:
        raise CapabilityError("freeze_for_exit_distillation needs a classifier with exit_layers: a language "
                              "model's exits share its final norm and head (CALM), so nothing would train")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in heads.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def classify_with_exit(model: nn.Module, input_ids: Tensor, mask: Tensor | None = None,
                       threshold: float = 0.9) -> tuple[Tensor, Tensor]:
    """(logits (b, c), exit layer (b,)): each row's logits from its first exit whose top probability
    exceeds ``threshold`` (the final head otherwise, layer n_layers - 1)."""
    if model.cfg.task != "classifier":
        raise CapabilityError(f"classify_with_exit needs a sequence classifier, not task={model.cfg.task!r}")
    exits, blocks = _exits(model), model.backbone.blocks
    model.eval()
    b = input_ids.shape[0]
    out = torch.zeros(b, model.cfg.n_classes, device=input_ids.device)
    where = torch.full((b,), model.cfg.n_layers - 1, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)

    def hook(k: int, layer: int):
        def run(module, args, kwargs, output):
            logits = classifier_exit_logits(model, k, output[0]).float()
            new = (logits.softmax(-1).amax(-1) > threshold) & ~done
            out[new], where[new] = logits[new], layer
            done.logical_or_(new)
            if bool(done.all()):
                raise _Exited(layer, output[0], logits, None)
        return run

    handles = [blocks[i].register_forward_hook(hook(k, i), with_kwargs=True) for k, i in enumerate(exits)]
    try:
        final = model(input_ids, mask=mask).float()
        out[~done] = final[~done]
    except _Exited:
        pass
    finally:
        for h in handles:
            h.remove()
    return out, where


@torch.no_grad()
def generate_with_exit(model: nn.Module, prompt_ids: Tensor, max_new_tokens: int = 32,
                       threshold: float = 0.9) -> tuple[Tensor, Tensor]:
    """Greedy CALM decoding: (prompt + new tokens (b, n + t), exit layer of each new token (t,))."""
    exits, blocks = _exits(model), model.backbone.blocks
    if model.cfg.task != "lm" or not model.backbone.can_decode:
        raise CapabilityError("generate_with_exit needs a causal LM whose mixers have a decode state")
    if any(isinstance(b, MoDBlock) for b in blocks):
        raise CapabilityError("generate_with_exit does not combine with Mixture-of-Depths blocks (a skipped "
                              "layer's cache would need its router's decision)")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ShapeError(f"prompt_ids must be (batch, seq>0), got {tuple(prompt_ids.shape)}")
    model.eval()
    cache = model.new_cache(prompt_ids.shape[0])
    logits = model(prompt_ids, cache=cache)[:, -1]  # prefill: full depth
    new, layers = [], [model.cfg.n_layers - 1]  # the first new token comes from the full-depth prefill

    def hook(layer: int):
        def run(module, args, kwargs, output):
            lg = lm_exit_logits(model, output[0][:, -1:])[:, -1].float()
            if bool((lg.softmax(-1).amax(-1) > threshold).all()):
                raise _Exited(layer, output[0], lg, kwargs["positions"])
        return run

    handles = [blocks[i].register_forward_hook(hook(i), with_kwargs=True) for i in exits]
    try:
        for t in range(max_new_tokens):
            tok = logits.argmax(-1)
            new.append(tok)
            if t == max_new_tokens - 1:
                break
            try:
                logits = model(tok[:, None], cache=cache)[:, -1]
                layers.append(model.cfg.n_layers - 1)
            except _Exited as e:
                for j in range(e.layer + 1, len(blocks)):  # copy the exit state up: fill the skipped caches
                    blk = blocks[j]
                    x = blk.norm1(e.hidden) if blk.placement in ("pre", "peri", "sandwich") else e.hidden
                    blk.mixer(x, mask=None, state=cache.states[j], positions=e.positions)
                cache.next_position = cache.next_position + 1
                logits = e.logits
                layers.append(e.layer)
    finally:
        for h in handles:
            h.remove()
    ids = torch.cat([prompt_ids, torch.stack(new, 1)], 1) if new else prompt_ids
    return ids, torch.tensor(layers[: len(new)], dtype=torch.long)
