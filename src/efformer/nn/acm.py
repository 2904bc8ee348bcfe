"""The Adaptive Computation Module of "Adaptive Computation Modules: Granular Conditional Computation
for Efficient Inference" (Wójcik et al., 2023): an ordered chain of small learners whose outputs add
up, and a per-token gate choosing how many of them run.

Here the learners are consecutive blocks of one GLU's hidden neurons (learner i: rows
``bounds[i]:bounds[i+1]`` of the gate, up and down weights, sizes differing by at most one), so a
token that runs k learners gets the GLU restricted to its first ``bounds[k]`` neurons, and all
learners together are the dense GLU with the same weights (``convert_to_acm`` turns a trained
swiglu into an ACM that way).

The gate is a small two-layer MLP giving logits over k = 1..n_learners. Training samples k with
straight-through Gumbel-softmax (a one-hot forward, the soft sample's gradient), which needs every
prefix's output, so training always computes all learners; the ``acm_cost`` auxiliary loss pulls
the batch's mean fraction of neurons run toward ``budget``. Evaluation and decoding take the
gate's argmax and run only the chosen learners: ``grouped`` sorts tokens by their k and runs one
prefix GLU per group (a loop over learner counts, never over tokens); ``reference`` runs token by
token. ``fixed_learners`` makes every token run that many learners (the gate unused), the setting
of the paper's first, module-wise distillation phase; its gate pre-training with artificial labels
is not implemented (the gate is trained end to end through the straight-through sample).
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.nn.ffn import _ACTS
from efformer.options import StrictModel, validate_options
from efformer.registry import FFNS


class ACMOptions(StrictModel):
    """Options of the ``acm`` feed-forward block (``ffn_options`` of the model config)."""

    n_learners: int = pydantic.Field(4, ge=1, description="Learners in the chain (blocks of the GLU's neurons).")
    budget: float = pydantic.Field(0.5, gt=0, le=1, description="Target mean fraction of the hidden neurons a "
                                   "token runs; the acm_cost loss pulls the batch mean toward it.")
    cost_loss_weight: float = pydantic.Field(0.1, ge=0, description="Weight of the squared budget deviation.")
    temperature: float = pydantic.Field(1.0, gt=0, description="Gumbel-softmax temperature of training samples.")
    gate_hidden: int | None = pydantic.Field(None, gt=0, description="Hidden width of the gating MLP; None: "
                                             "d_model // 4.")
    fixed_learners: int | None = pydantic.Field(None, ge=1, description="Every token runs this many learners "
                                                "(the gate unused); None: the gate chooses.")
    activation: Literal["silu", "gelu", "relu"] = pydantic.Field("silu", description="GLU activation.")
    form: Literal["auto", "grouped", "reference"] = pydantic.Field(
        "auto", description="Evaluation dispatch: grouped (tokens sorted by learner count, one prefix GLU per "
        "count) or reference (token by token); auto = grouped. Training always runs every learner.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> ACMOptions:
        if self.fixed_learners is not None and self.fixed_learners > self.n_learners:
            raise ValueError(f"fixed_learners={self.fixed_learners} is more than n_learners={self.n_learners}")
        return self


@FFNS.register("acm")
class ACM(nn.Module):
    """Adaptive Computation Module: (b, n, d) -> (b, n, d); ``stats["learners"]`` (b*n,) is each token's count."""

    Options = ACMOptions
    takes_mask = True  # padding is left out of the budget loss

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, *, options=None, causal: bool = False):
        super().__init__()
        self.opts = o = validate_options(ACMOptions, options, "ffn_options")
        hidden = max(o.n_learners, round(2 * mult * d_model / 3))  # the GLU width, as swiglu (>= 1 per learner)
        self.bounds = [round(i * hidden / o.n_learners) for i in range(o.n_learners + 1)]
        bound = d_model ** -0.5
        # (hidden, d) each, as MatFormer's: learner i owns rows bounds[i]:bounds[i+1] of all three
        self.w_gate = nn.Parameter(torch.empty(hidden, d_model).uniform_(-bound, bound))
        self.w_up = nn.Parameter(torch.empty(hidden, d_model).uniform_(-bound, bound))
        self.w_down = nn.Parameter(torch.empty(hidden, d_model).uniform_(-hidden ** -0.5, hidden ** -0.5))
        gh = o.gate_hidden or max(1, d_model // 4)
        # named router so DeepNorm leaves it unscaled, as MoE routers
        self.router = nn.Sequential(nn.Linear(d_model, gh), nn.GELU(), nn.Linear(gh, o.n_learners))
        self.act = _ACTS[o.activation]
        self.drop = nn.Dropout(dropout)
        self.aux_losses: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}

    def prefix(self, x: Tensor, k: int) -> Tensor:
        """The first ``k`` learners' summed output on x (m, d) -> (m, d)."""
        h = self.bounds[k]
        a = self.act(F.linear(x, self.w_gate[:h])) * F.linear(x, self.w_up[:h])
        return self.drop(a) @ self.w_down[:h]

    def choose(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(learner counts (t,) in 1..n, straight-through one-hot sample (t, n) in training else None)."""
        o = self.opts
        t = x.shape[0]
        if o.fixed_learners is not None:
            return torch.full((t,), o.fixed_learners, dtype=torch.long, device=x.device), None
        logits = self.router(x).float()
        if not self.training:
            return logits.argmax(-1) + 1, None
        soft = F.gumbel_softmax(logits, tau=o.temperature, hard=False)
        hard = F.one_hot(soft.argmax(-1), o.n_learners).to(soft.dtype)
        return soft.argmax(-1) + 1, hard - soft.detach() + soft  # forward one-hot, backward the soft sample

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(b, n, d) -> (b, n, d); ``mask`` (b, n) keeps real tokens."""
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        valid = mask.reshape(-1) if mask is not None else torch.ones(b * n, dtype=torch.bool, device=x.device)
        k, sample = self.choose(flat)
        if sample is None:
            k = k.masked_fill(~valid, 0)  # padding runs no learner (a zero output)
        if sample is not None:
            y = self._all_prefixes(flat, sample)
        elif self.opts.form == "reference":
            y = torch.stack([self.prefix(flat[t : t + 1], int(k[t]))[0] for t in range(b * n)]) if b * n else flat
        else:
            y = self._grouped(flat, k)
        hidden = self.bounds[-1]
        frac = torch.tensor(self.bounds[1:], dtype=torch.float, device=x.device) / hidden  # (n_learners,)
        used = (sample @ frac) if sample is not None else frac[(k - 1).clamp(min=0)]  # neurons run per token
        mean = used[valid].mean() if bool(valid.any()) else used.new_zeros(())
        self.aux_losses = {"acm_cost": self.opts.cost_loss_weight * (mean - self.opts.budget) ** 2} \
            if sample is not None else {}
        self.stats = {"learners": k.masked_fill(~valid, 0), "fraction": mean.detach()}  # 0 learners: padding
        return y.reshape(b, n, d)

    def _all_prefixes(self, x: Tensor, sample: Tensor) -> Tensor:
        """Training: every learner on every token, cumulated into prefix outputs (t, n, d), mixed by the sample."""
        a = self.act(F.linear(x, self.w_gate)) * F.linear(x, self.w_up)
        a = self.drop(a)
        parts = [a[:, lo:hi] @ self.w_down[lo:hi] for lo, hi in zip(self.bounds, self.bounds[1:], strict=False)]
        prefixes = torch.stack(parts, 1).cumsum(1)
        return torch.einsum("tn,tnd->td", sample.to(prefixes.dtype), prefixes)

    def _grouped(self, x: Tensor, k: Tensor) -> Tensor:
        """Only the chosen learners: tokens sorted by count, one prefix GLU per count present (0: zeros)."""
        order = torch.sort(k, stable=True).indices
        counts = torch.bincount(k, minlength=self.opts.n_learners + 1).tolist()
        parts = [self.prefix(chunk, j) if j else torch.zeros_like(chunk)
                 for j, chunk in enumerate(x[order].split(counts)) if len(chunk)]
        y = torch.cat(parts) if parts else x
        return torch.empty_like(y).index_copy_(0, order, y)
