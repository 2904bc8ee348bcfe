"""Trainable token reduction: Learnable Token Merging's mask module and IA-RED²'s learned drop policy.

Papers: "Efficient Visual Transformer by Learnable Token Merging" (Wang & Yang, 2024: LTM, a mask
module decides the merges and is trained to lower a variational upper bound of the Information
Bottleneck loss); "IA-RED²: Interpretability-Aware Redundancy Reduction for Vision Transformers"
(Pan et al., NeurIPS 2021: a multi-head interpreter per stage gives every patch a keep probability,
trained with REINFORCE on a reward for being right with few patches).

Both are methods of :func:`efformer.reduce.apply`. ``apply`` calls ``attach``, which registers the
method's modules on the model as ``model.reduce_learned`` (one module per reduction point), so the
trainer's optimizer, checkpoints (exact resume included) and ``train()`` / ``eval()`` reach them;
``freeze_backbone=True`` trains only them. Train with ``Trainer(..., loss_fn=train_loss)``: the task's
cross-entropy plus each method's own per-example terms. In ``eval()`` both follow the schedule exactly
(r tokens per point); in ``train()`` LTM samples its merges (straight-through Gumbel-softmax) and
IA-RED² samples its drops, which it applies by giving dropped tokens size 0: proportional attention
then adds log 0 = -inf to their keys, so nothing attends to them, which for the class token is the
same as removing them, while every row keeps one shape. Choices the paper texts available here did
not settle are written next to the code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import CheckpointError, EfformerError
from efformer.models.io import CONFIG_SECTIONS
from efformer.reduce.api import apply
from efformer.reduce.hook import Assignment, ReduceError, TokenView
from efformer.reduce.methods import METHODS, Method, identity_dst, normalized, prune


def block_width(block: nn.Module) -> int:
    """The width d of the tokens a block outputs (its mixer's d_model)."""
    return int(block.mixer.d_model)


def mark_for_save(model: nn.Module, method: Method, reducer: Any) -> None:
    """Set ``model.reduce``, the config.json section with which ``efformer.load`` re-applies this reduction
    before it reads the weights (the method's modules are among them)."""
    model.reduce = {"method": method.name, "schedule": reducer.schedule.model_dump(), "prop_attn": reducer.prop_attn,
                    "where": reducer.where, "options": method.opts.model_dump()}


def unmark(model: nn.Module) -> None:
    """Drop the ``reduce`` section: a model without trainable reduction saves as a plain model."""
    model.__dict__.pop("reduce", None)


def apply_reduce_section(model: nn.Module, section: object, path: Path) -> None:
    """Re-apply the reduction a saved folder's ``reduce`` section describes (see :func:`mark_for_save`)."""
    try:
        apply(model, section["method"], section["schedule"], prop_attn=section["prop_attn"],
              where=section.get("where"), **section["options"])
    except (KeyError, TypeError, EfformerError) as e:
        raise CheckpointError(f"{path}: its 'reduce' section {section!r} cannot be applied ({e}); re-save the "
                              "model with efformer.save after efformer.reduce.apply") from None


CONFIG_SECTIONS["reduce"] = apply_reduce_section


class TrainableMethod(Method):
    """A method with a module per reduction point, registered on the model by :meth:`attach`."""

    class Options(Method.Options):
        freeze_backbone: bool = pydantic.Field(False, description="train only the reduction modules: every other "
                                               "parameter gets requires_grad=False until remove()")

    net: nn.ModuleList | None = None
    default_where: ClassVar[str] = "between"  # LTM's and IA-RED²'s modules sit between blocks, as in the papers

    def build(self, d: int) -> nn.Module:  # pragma: no cover - abstract
        """The module of one reduction point over tokens of width d."""
        raise NotImplementedError

    def attach(self, model: nn.Module, stacks: list, reducer: Any) -> None:
        """Build one module per reduction point (kept when this instance is applied to the same blocks again),
        register them as ``model.reduce_learned``, freeze the rest if asked."""
        points = [blk for blocks in stacks for blk in blocks[:reducer.points_in(len(blocks))]]  # mid: every block
        device = next(model.parameters()).device
        same = self.net is not None and list(self._point) == [id(blk) for blk in points]
        if not same:  # applying this (trained) instance again to the same blocks keeps its modules
            self._point = {id(blk): i for i, blk in enumerate(points)}
            self.net = nn.ModuleList(self.build(block_width(blk)) for blk in points).to(device)
        self.net.train(model.training)
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        if self.opts.freeze_backbone:
            self._frozen = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in self._frozen:
                p.requires_grad_(False)
        model.reduce_learned = self.net
        mark_for_save(model, self, reducer)
        self.clear()

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach`: the modules leave the model, frozen parameters get their requires_grad back."""
        if "reduce_learned" in model._modules:
            del model._modules["reduce_learned"]
        unmark(model)
        for p, flag in getattr(self, "_frozen", []):
            p.requires_grad_(flag)
        self._frozen = []

    def module_at(self, view: TokenView) -> tuple[int, nn.Module]:
        """(point index, module) of the reduction point after block ``view.j``; a new forward clears the records."""
        if self.net is None:
            raise ReduceError(self.name, "not attached", "build it with efformer.reduce.apply(model, ...), which "
                              "registers its modules on the model")
        i = self._point[id(view.blocks[view.j])]
        if i <= self._last:  # points run in order, so a lower index starts another forward
            self.clear()
        self._last = i
        return i, self.net[i]

    def clear(self) -> None:
        """Forget what the last training forward recorded for the loss."""
        self._last = -1

    def extra_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        """Per-example terms (b,) the method adds to the task loss, from what the last forward recorded."""
        return torch.zeros_like(label, dtype=logits.dtype)


# ---- Learnable Token Merging -----------------------------------------------------------------
class MergeMask(nn.Module):
    """LTM's mask module at one point: tokens (b, t, d) -> anchor scores (b, t) and unit merge embeddings (b, t, e)."""

    def __init__(self, d: int, e: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.score = nn.Linear(d, 1)
        self.embed = nn.Linear(d, e)
        nn.init.zeros_(self.score.weight)  # start with no anchor preference: the similarities decide
        nn.init.zeros_(self.score.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(scores (b, t), embeddings (b, t, e))."""
        z = self.norm(x)
        return self.score(z)[..., 0], normalized(self.embed(z))


class LTM(TrainableMethod):
    """Learnable Token Merging: a mask module picks t - r anchors and sends every other token to one of them.

    The merge mask M (t - r, t) has M[a, i] = softmax over anchors a of (cos(e_a, e_i) / temperature + s_a),
    with e the learned merge embeddings and s the learned anchor scores (the anchors are the t - r highest s,
    the protected prefix always among them and receiving nothing). ``eval()``: each token goes to its
    argmax anchor (size-weighted merging). ``train()``: a straight-through Gumbel-softmax sample of M, so the
    forward merges like inference while gradients reach e and s. Loss (:func:`train_loss`): cross-entropy,
    the relevance side of the IB bound, plus ``beta`` times, per merged token, KL(M[:, i] || uniform over the
    anchors) = log K - H(M[:, i]): the variational upper bound of I(merged tokens; input) for a stochastic
    assignment with a uniform prior, which is separable over tokens. (Our reading of the paper's separable
    bound; its exact form and mask architecture were not in the texts available here.)
    """

    name = "ltm"

    class Options(TrainableMethod.Options):
        embed_dim: int = pydantic.Field(32, ge=1, le=4096, description="width of the mask module's merge embeddings")
        temperature: float = pydantic.Field(0.1, gt=0, description="temperature of the cosine logits of the mask")
        gumbel_tau: float = pydantic.Field(1.0, gt=0, description="Gumbel-softmax temperature while training")
        hard: bool = pydantic.Field(True, description="straight-through (one-hot forward) samples while training; "
                                    "False: soft many-to-many merges while training")
        beta: float = pydantic.Field(0.01, ge=0, description="weight of the compression (KL) term of the IB bound")

    def build(self, d: int) -> nn.Module:
        """A :class:`MergeMask` for tokens of width d."""
        return MergeMask(d, self.opts.embed_dim)

    def clear(self) -> None:
        """Forget the recorded KL terms."""
        super().clear()
        self._kl: list[Tensor] = []

    def assign(self, view: TokenView, r: int) -> Assignment:
        """Anchors by learned score; argmax merging in eval, a Gumbel sample as a transformation matrix in train."""
        _, mod = self.module_at(view)
        x, p, mask = view.tok.x, view.protected, view.tok.mask
        b, t, _ = x.shape
        score, e = mod(x)
        rank = score.detach().clone()
        if mask is not None:
            rank = rank.masked_fill(~mask, -math.inf)  # padding never becomes an anchor
        rank[:, :p] = math.inf
        anchors = rank.argsort(-1, descending=True)[:, : t - r].sort(-1).values  # (b, t'), in token order
        kept = torch.zeros(b, t, dtype=torch.bool, device=x.device).scatter(1, anchors, True)
        ea = e.gather(1, anchors[..., None].expand(-1, -1, e.shape[2]))
        logits = ea @ e.transpose(1, 2) / self.opts.temperature + score.gather(1, anchors)[..., None]
        logits = logits.masked_fill((anchors < p)[..., None], -math.inf)  # nothing merges into protected tokens
        ar = torch.arange(t, device=x.device)
        if not mod.training:
            return Assignment(torch.where(kept, ar, anchors.gather(1, logits.argmax(1))))
        w = F.gumbel_softmax(logits, tau=self.opts.gumbel_tau, hard=self.opts.hard, dim=1)
        eye = torch.zeros_like(w).scatter(2, anchors[..., None], 1.0)
        matrix = torch.where(kept[:, None, :], eye, w)  # an anchor stays itself
        self._kl.append(self._compression(logits, kept, mask, t - r - p))
        return Assignment(torch.where(kept, ar, anchors.gather(1, w.argmax(1))), matrix=matrix)

    @staticmethod
    def _compression(logits: Tensor, kept: Tensor, mask: Tensor | None, k: int) -> Tensor:
        """Mean over merged real tokens of KL(q_i || uniform over the k unprotected anchors) (b,)."""
        q = logits.softmax(1)
        kl = math.log(k) + (q * q.clamp(min=1e-30).log()).sum(1)  # (b, t)
        merged = ~kept if mask is None else ~kept & mask
        return (kl * merged).sum(1) / merged.sum(1).clamp(min=1)

    def extra_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        """beta x the KL terms summed over the points of the last forward (b,)."""
        kl = getattr(self, "_kl", [])
        out = self.opts.beta * torch.stack(kl).sum(0) if kl else super().extra_loss(logits, label)
        self.clear()
        return out


# ---- IA-RED² ---------------------------------------------------------------------------------
class Interpreter(nn.Module):
    """IA-RED²'s multi-head interpreter at one point: tokens (b, t, d) -> keep probabilities (b, t).

    Each head scores its slice of the normalized token with a small MLP; the keep logit is the mean over
    heads. (The paper's interpreter mirrors the heads of the attention; this per-head MLP is our choice.)"""

    def __init__(self, d: int, heads: int, hidden: int, init_keep: float):
        super().__init__()
        dh = d // heads
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.w1 = nn.Parameter(torch.randn(heads, dh, hidden) * dh**-0.5)
        self.b1 = nn.Parameter(torch.zeros(heads, hidden))
        self.w2 = nn.Parameter(torch.randn(heads, hidden) * 0.01)
        self.b2 = nn.Parameter(torch.full((heads,), math.log(init_keep / (1 - init_keep))))

    def forward(self, x: Tensor) -> Tensor:
        """Keep probability of every token (b, t)."""
        b, t, d = x.shape
        z = self.norm(x).view(b, t, self.heads, d // self.heads)
        h = F.gelu(torch.einsum("bthd,hdm->bthm", z, self.w1) + self.b1)
        return torch.sigmoid((torch.einsum("bthm,hm->bth", h, self.w2) + self.b2).mean(-1))


class IARED2(TrainableMethod):
    """IA-RED²: a learned keep probability per token; ``eval()`` drops the r least likely to be kept.

    ``train()``: every unprotected token still in play is kept with a Bernoulli sample of its probability;
    the reward is 1 - f² for a right prediction and -penalty for a wrong one (the paper's form), f being the
    fraction of tokens kept, averaged over the reduction points. The loss adds -(R - mean R) log pi(u) per
    example (REINFORCE with the batch mean as baseline, our choice of baseline) to the cross-entropy, which
    trains the backbone too unless ``freeze_backbone``. The schedule sets how many tokens inference drops;
    the policy ranks them.
    """

    name = "ia_red2"

    class Options(TrainableMethod.Options):
        heads: int = pydantic.Field(4, ge=1, description="heads of the interpreter (must divide the width)")
        hidden: int = pydantic.Field(16, ge=1, le=4096, description="hidden width of each head's MLP")
        init_keep: float = pydantic.Field(0.9, gt=0, lt=1, description="keep probability the policy starts at")
        penalty: float = pydantic.Field(0.5, ge=0, description="tau: the reward of a wrong prediction is -tau")

    def attach(self, model: nn.Module, stacks: list, reducer: Any) -> None:
        """As :meth:`TrainableMethod.attach`; refused without proportional attention, which hides dropped tokens."""
        if not reducer.prop_attn:
            raise ReduceError("prop_attn", False, "ia_red2 drops tokens while training by giving them size 0, which "
                              "only proportional attention (log-size key bias) hides from attention; keep "
                              "prop_attn=True")
        super().attach(model, stacks, reducer)

    def build(self, d: int) -> nn.Module:
        """An :class:`Interpreter` for tokens of width d."""
        if d % self.opts.heads:
            raise ReduceError("ia_red2.heads", self.opts.heads, f"must divide the token width {d}; pick a divisor")
        return Interpreter(d, self.opts.heads, self.opts.hidden, self.opts.init_keep)

    def clear(self) -> None:
        """Forget the recorded log-probabilities and kept fractions."""
        super().clear()
        self._log_prob: list[Tensor] = []
        self._kept: list[Tensor] = []

    def assign(self, view: TokenView, r: int) -> Assignment:
        """Sampled keep/drop (sizes) in train; drop the r lowest keep probabilities (padding first) in eval."""
        _, pol = self.module_at(view)
        x, p = view.tok.x, view.protected
        b, t, _ = x.shape
        keep_p = pol(x)
        alive = view.tok.size > 0  # (tokens dropped earlier in this forward, and padding, have size 0)
        if not pol.training:
            rank = keep_p.masked_fill(~alive, -math.inf)
            rank[:, :p] = math.inf
            drop = torch.ones(b, t, dtype=torch.bool, device=x.device)
            drop = drop.scatter(1, rank.argsort(-1, descending=True)[:, : t - r], False)
            return prune(normalized(view.metric()), drop, p)
        free = alive.clone()
        free[:, :p] = False
        u = torch.bernoulli(keep_p.detach()).bool() | ~free
        logp = torch.where(u, keep_p.clamp(min=1e-6).log(), (1 - keep_p).clamp(min=1e-6).log())
        self._log_prob.append((logp * free).sum(1))
        self._kept.append((u & free).sum(1) / free.sum(1).clamp(min=1))
        return Assignment(identity_dst(b, t, x.device), weight=u.to(view.tok.size.dtype))

    def extra_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        """The REINFORCE term -(R - mean R) log pi(u) per example (b,), from the last forward's samples."""
        if not getattr(self, "_log_prob", []):
            return super().extra_loss(logits, label)
        f = torch.stack(self._kept).mean(0)
        right = logits.argmax(-1) == label
        reward = torch.where(right, 1 - f**2, torch.full_like(f, -self.opts.penalty))
        out = -(reward - reward.mean()).detach() * torch.stack(self._log_prob).sum(0)
        self.clear()
        return out.to(logits.dtype)


METHODS.update({LTM.name: LTM, IARED2.name: IARED2})


# ---- the trainer's loss ----------------------------------------------------------------------
def method_of(model: nn.Module) -> Any:
    """The reduction method attached to ``model`` (unwrapping DDP), or None."""
    model = getattr(model, "module", model)
    red = getattr(model, "reducer", None) or getattr(getattr(model, "backbone", None), "reducer", None)
    return None if red is None else red.method


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if "images" in batch:
        return model(batch["images"]).float()
    if "ids1" in batch:
        return model(batch["ids1"], batch["ids2"], mask1=batch["mask1"], mask2=batch["mask2"]).float()
    return model(batch["input_ids"], mask=batch["mask"]).float()


def train_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The trainer's ``loss_fn`` for classifiers with a trainable reduction: summed cross-entropy plus the
    method's per-example terms (LTM's KL, IA-RED²'s REINFORCE term); (summed loss, count, {"correct"})."""
    if "label" not in batch:
        raise ReduceError("loss_fn", "train_loss", "trainable token reduction trains classifiers (batches with "
                          "'label'); language models cannot be reduced")
    method = method_of(model)
    if method is not None and hasattr(method, "clear"):
        method.clear()  # nothing recorded outside this step's forward counts
    logits, label = _logits(model, batch), batch["label"]
    ce = F.cross_entropy(logits, label, reduction="none")
    extra = method.extra_loss(logits, label) if hasattr(method, "extra_loss") else torch.zeros_like(ce)
    correct = (logits.argmax(-1) == label).sum()
    return (ce + extra).sum(), torch.tensor(label.numel(), device=label.device), {"correct": correct}
