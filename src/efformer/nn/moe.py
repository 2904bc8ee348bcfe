"""Mixture-of-Experts feed-forward blocks.

Token-choice top-k routing with the load-balancing loss of "Switch Transformers: Scaling to Trillion
Parameter Models with Simple and Efficient Sparsity" / "GShard" and the router z-loss of "ST-MoE:
Designing Stable and Transferable Sparse Expert Models"; a capacity factor with dropped-token
accounting; expert-choice routing ("Mixture-of-Experts with Expert Choice Routing"); shared,
always-on experts and fine-grained experts ("DeepSeekMoE"); and the descend-experts-ascend structure
of "BigMac: A Communication-Efficient Mixture-of-Experts Model Structure" (experts work in a smaller
dimension between one shared down and one shared up projection); and "Pre-gated MoE: An
Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert Inference" (``pregated``: the
next MoE layer's router reads this layer's FFN input, so the next layer's experts are known one
layer ahead and ``on_plan`` can fetch their weights while this layer computes).

Fine-grained experts are more, narrower experts with a larger top-k: each expert's width defaults to
the dense GLU width divided by (top_k + n_shared), so active parameters equal the dense FFN's.

Dispatch sorts the kept (token, expert) assignments by expert. ``form="batched"`` places them in an
(experts, slots, d) buffer and runs two batched matmuls (one kernel for all experts: GPUs);
``form="grouped"`` runs each expert once over its contiguous slice of the sorted tokens (no padding
to the busiest expert: CPUs); ``auto`` picks batched on CUDA, grouped elsewhere. ``form="reference"``
routes and mixes token by token.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import CapabilityError
from efformer.nn.ffn import _ACTS
from efformer.options import StrictModel, validate_options
from efformer.registry import FFNS


class MoEOptions(StrictModel):
    """Options of the ``moe`` feed-forward block (``ffn_options`` of the model config)."""

    n_experts: int = pydantic.Field(8, ge=1, description="Number of routed experts.")
    top_k: int = pydantic.Field(2, ge=1, description="Token choice: experts per token; must be <= n_experts.")
    routing: Literal["token", "expert"] = pydantic.Field(
        "token", description="token: each token picks its top-k experts; expert: each expert picks its tokens.")
    capacity_factor: float | None = pydantic.Field(
        None, gt=0, description="Slots per expert = ceil(factor * tokens * top_k / n_experts); None: no limit "
        "(token choice). Token choice applies it in training only, so evaluation and cached decoding route "
        "every token; expert choice always needs it (default 1.0).")
    n_shared: int = pydantic.Field(0, ge=0, description="Always-on shared experts added to every token.")
    expert_hidden: int | None = pydantic.Field(
        None, gt=0, description="Hidden width of one expert; None: dense GLU width / (top_k + n_shared).")
    bigmac_dim: int | None = pydantic.Field(
        None, gt=0, description="BigMac: experts work in this smaller dimension between a shared descend "
        "and ascend projection; None: experts work in d_model.")
    activation: Literal["silu", "gelu", "relu"] = pydantic.Field("silu", description="GLU expert activation.")
    aux_loss_weight: float = pydantic.Field(0.01, ge=0, description="Weight of the load-balancing loss.")
    z_loss_weight: float = pydantic.Field(0.001, ge=0, description="Weight of the router z-loss.")
    normalize_topk: bool = pydantic.Field(False, description="Renormalise the top-k gates to sum to one.")
    expert_scale: float = pydantic.Field(
        1.0, gt=0, description="Multiplier of the routed experts' sum (n_experts after converting a dense FFN: "
        "a uniform router then weighs each expert 1).")
    expert_lr_scale: float = pydantic.Field(
        1.0, gt=0, description="The trainer's learning rate for the routed experts' weights is multiplied by "
        "this (each expert sees about top_k / n_experts of the tokens, so fewer updates than a dense FFN).")
    pregated: bool = pydantic.Field(
        False, description="Pre-gated MoE: each MoE layer's router is applied to the previous MoE layer's "
        "input (the first routes itself), so expert choices are known one layer ahead.")
    allow_future_routing: bool = pydantic.Field(
        False, description="Let expert-choice routing run in a causal model (its selection sees later "
        "tokens of the sequence, so it is for training-time comparisons only).")
    form: Literal["auto", "reference", "batched", "grouped"] = pydantic.Field(
        "auto", description="Dispatch: batched (padded bmm, GPUs), grouped (one matmul per expert, CPUs), "
        "reference (a loop over tokens); auto picks batched on CUDA, else grouped.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> MoEOptions:
        if self.pregated and self.routing != "token":
            raise ValueError("pregated=true needs routing='token' (a layer plans the next one's top-k experts)")
        if self.routing == "token" and self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} is larger than n_experts={self.n_experts}; lower top_k "
                             "or add experts")
        return self


def _glu_hidden(d_model: int, mult: float) -> int:
    return max(1, round(2 * mult * d_model / 3))


def expert_width(d_model: int, mult: float, o: MoEOptions) -> int:
    """Hidden width of one expert: ``expert_hidden``, else the dense GLU width / (top_k + n_shared)."""
    return o.expert_hidden or max(1, round(_glu_hidden(d_model, mult) / (o.top_k + o.n_shared)))


@FFNS.register("moe")
class MoE(nn.Module):
    """Mixture-of-Experts FFN: (b, n, d) -> (b, n, d); ``aux_losses`` and ``stats`` hold the last call's."""

    Options = MoEOptions
    takes_mask = True  # the block passes its keep-mask: padding takes no capacity and no loss

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, *, options=None,
                 causal: bool = False):
        super().__init__()
        self.opts = o = validate_options(MoEOptions, options, "ffn_options")
        if o.routing == "expert" and causal and not o.allow_future_routing:
            raise CapabilityError("ffn_options.routing='expert' in a causal model: an expert picks its tokens "
                                  "among the whole sequence, so a token's output depends on later tokens; use "
                                  "routing='token', or set ffn_options.allow_future_routing=true for a "
                                  "training-only comparison")
        self.d_model = d_model
        inner = o.bigmac_dim or d_model
        hidden = expert_width(d_model, mult, o)
        self.hidden = hidden
        if o.bigmac_dim:
            self.descend = nn.Linear(d_model, inner, bias=False)
            self.ascend = nn.Linear(inner, d_model, bias=False)
        self.router = nn.Linear(d_model, o.n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(o.n_experts, inner, 2 * hidden))  # gate | up, per expert
        self.w_out = nn.Parameter(torch.empty(o.n_experts, hidden, inner))
        nn.init.uniform_(self.w_in, -inner ** -0.5, inner ** -0.5)
        nn.init.uniform_(self.w_out, -hidden ** -0.5, hidden ** -0.5)
        if o.expert_lr_scale != 1.0:  # read by the trainer's parameter groups
            self.w_in.lr_scale = self.w_out.lr_scale = o.expert_lr_scale
        if o.n_shared:  # n shared experts of width h, summed with gate 1, are one GLU of width n*h
            self.shared_in = nn.Linear(d_model, 2 * o.n_shared * hidden, bias=False)
            self.shared_out = nn.Linear(o.n_shared * hidden, d_model, bias=False)
        self.act = _ACTS[o.activation]
        self.drop = nn.Dropout(dropout)
        self.aux_losses: dict[str, Tensor] = {}
        self._next: tuple[MoE, ...] = ()  # pre-gated: the next MoE layer, routed from this layer's input
        self._pre_logits: Tensor | None = None  # pre-gated: this layer's router logits, made a layer ahead
        self.on_plan = None  # pre-gated: called as on_plan(moe, expert_ids) as soon as its experts are known
        self.stats: dict[str, Tensor] = {}

    # ---- routing -------------------------------------------------------------------------------
    def capacity(self, n_tokens: int) -> int | None:
        """Slots per expert for ``n_tokens`` real tokens, or None for no limit."""
        o = self.opts
        if o.routing == "expert":
            return max(1, math.ceil((o.capacity_factor or 1.0) * n_tokens / o.n_experts))
        if o.capacity_factor is None or not self.training:
            return None
        return max(1, math.ceil(o.capacity_factor * n_tokens * o.top_k / o.n_experts))

    def route(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Kept assignments of flat tokens x (t, d): (token index (a,), expert (a,), gate (a,)).

        Also sets ``aux_losses`` and ``stats`` (tokens per expert, dropped assignments)."""
        o = self.opts
        logits = self.router_logits(x)
        probs = logits.softmax(-1)
        n_valid = int(valid.sum())
        cap = self.capacity(n_valid)
        real = valid.nonzero().squeeze(1)
        aux: dict[str, Tensor] = {}
        if o.routing == "expert":
            # every expert takes exactly `cap` tokens (padding scores -1, below any probability, so it is
            # taken only when cap exceeds the real tokens; those picks are then not kept)
            scores = probs.masked_fill(~valid[:, None], -1.0).t()  # (e, t)
            gate, tok = scores.topk(min(cap, x.shape[0]), dim=-1)
            expert = torch.arange(o.n_experts, device=x.device)[:, None].expand_as(tok)
            tok, expert, gate = tok.reshape(-1), expert.reshape(-1), gate.reshape(-1)
            keep = valid[tok]
            routed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            routed[tok[keep]] = True
            stats = {"unrouted_tokens": (valid & ~routed).sum(), "dropped": torch.zeros((), dtype=torch.long)}
        else:
            topv, topi = probs.topk(o.top_k, dim=-1)
            if o.normalize_topk:
                topv = topv / topv.sum(-1, keepdim=True)
            # slot-major order: every token's first choice claims capacity before any second choice
            tok = real.repeat(o.top_k)
            expert = topi[real].t().reshape(-1)
            gate = topv[real].t().reshape(-1)
            keep = torch.ones_like(tok, dtype=torch.bool)
            if cap is not None:
                one_hot = F.one_hot(expert, o.n_experts)
                slot = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of this assignment in its expert
                keep = slot < cap
            stats = {"dropped": (~keep).sum()}
            # Switch/GShard: n_experts * sum_e (fraction of assignments to e) * (mean router prob of e)
            f = torch.bincount(expert, minlength=o.n_experts).float() / max(expert.numel(), 1)
            p = probs[real].mean(0) if n_valid else probs.new_zeros(o.n_experts)
            aux["moe_balance"] = o.aux_loss_weight * o.n_experts * (f * p).sum()
        z = torch.logsumexp(logits[real], -1).square().mean() if n_valid else logits.new_zeros(())
        aux["moe_z"] = o.z_loss_weight * z
        self.aux_losses = aux
        tok, expert, gate = tok[keep], expert[keep], gate[keep]
        self.stats = {**stats, "tokens_per_expert": torch.bincount(expert, minlength=o.n_experts)}
        return tok, expert, gate.to(x.dtype)

    # ---- experts -------------------------------------------------------------------------------
    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on (m, inner) -> (m, inner)."""
        gate, up = (x @ self.w_in[e]).chunk(2, -1)
        return self.drop(self.act(gate) * up) @ self.w_out[e]

    def _dispatch(self, x: Tensor, tok: Tensor, expert: Tensor, gate: Tensor, batched: bool) -> Tensor:
        e_count = self.opts.n_experts
        order = torch.sort(expert, stable=True).indices
        tok, expert, gate = tok[order], expert[order], gate[order]
        counts = torch.bincount(expert, minlength=e_count)
        if not batched:
            parts = [self.expert(e, chunk) for e, chunk in enumerate(x[tok].split(counts.tolist())) if len(chunk)]
            y = torch.cat(parts) if parts else x.new_zeros(0, x.shape[-1])
            return y.new_zeros(x.shape).index_add_(0, tok, y * gate[:, None].to(y.dtype))
        starts = counts.cumsum(0) - counts
        slot = torch.arange(expert.numel(), device=x.device) - starts[expert]
        width = int(counts.max()) if expert.numel() else 0
        buf = x.new_zeros(e_count, width, x.shape[-1])
        buf[expert, slot] = x[tok]
        gate_up = torch.bmm(buf, self.w_in)  # (e, slots, 2h): one batched matmul for every expert
        g, u = gate_up.chunk(2, -1)
        y = torch.bmm(self.drop(self.act(g) * u), self.w_out)[expert, slot]
        return y.new_zeros(x.shape).index_add_(0, tok, y * gate[:, None].to(y.dtype))

    def _reference(self, x: Tensor, valid: Tensor) -> Tensor:
        """Flat tokens (t, d) -> routed mixture (t, inner), token by token, routing included (first choices
        claim capacity before second choices, each in token order)."""
        o = self.opts
        probs = self.router_logits(x).softmax(-1)
        order = probs.detach()
        inner = self.descend(x) if o.bigmac_dim else x
        out = inner.new_zeros(inner.shape)
        real = valid.nonzero().squeeze(1).tolist()
        cap = self.capacity(len(real))
        if o.routing == "expert":
            for e in range(o.n_experts):
                ranked = sorted(real, key=lambda t: (-float(order[t, e]), t))
                for t in ranked[:cap]:
                    out[t] = out[t] + probs[t, e].to(x.dtype) * self.expert(e, inner[t : t + 1])[0]
            return out
        used = [0] * o.n_experts
        for j in range(o.top_k):
            for t in real:
                top = probs[t].topk(o.top_k)
                e, g = int(top.indices[j]), top.values[j]
                if o.normalize_topk:
                    g = g / top.values.sum()
                if cap is None or used[e] < cap:
                    used[e] += 1
                    out[t] = out[t] + g.to(x.dtype) * self.expert(e, inner[t : t + 1])[0]
        return out

    def router_logits(self, x: Tensor) -> Tensor:
        """Router logits (t, e) in float32: made by the previous layer when pre-gated, else from x (t, d)."""
        return self._pre_logits if self._pre_logits is not None else self.router(x).float()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(b, n, d) -> (b, n, d); ``mask`` (b, n) keeps real tokens (padding gets a zero routed output)."""
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        valid = mask.reshape(-1) if mask is not None else torch.ones(b * n, dtype=torch.bool, device=x.device)
        if self.on_plan is not None and self._pre_logits is None:
            self.on_plan(self, self.router_logits(flat)[valid].topk(self.opts.top_k, -1).indices.unique())
        if self._next:  # route the next layer now, from this layer's input: its experts are known early
            nxt = self._next[0]
            nxt._pre_logits = nxt.router(flat).float()
            if nxt.on_plan is not None:
                nxt.on_plan(nxt, nxt._pre_logits[valid].topk(nxt.opts.top_k, -1).indices.unique())
        try:
            tok, expert, gate = self.route(flat, valid)  # also sets aux_losses and stats
            y = self._mix(flat, valid, tok, expert, gate)
        finally:
            self._pre_logits = None  # used once
        return y.reshape(b, n, d)

    def _mix(self, flat: Tensor, valid: Tensor, tok: Tensor, expert: Tensor, gate: Tensor) -> Tensor:
        form = self.opts.form
        if form == "reference":
            y = self._reference(flat, valid)
        else:
            batched = form == "batched" or (form == "auto" and flat.is_cuda)
            y = self._dispatch(self.descend(flat) if self.opts.bigmac_dim else flat, tok, expert, gate, batched)
        y = y * self.opts.expert_scale
        if self.opts.bigmac_dim:
            y = self.ascend(y)
        if self.opts.n_shared:
            g, u = self.shared_in(flat).chunk(2, -1)
            y = y + self.shared_out(self.drop(self.act(g) * u))
        return y


def link_pregated(ffns: list[nn.Module]) -> None:
    """Chain consecutive pre-gated MoE layers of a model (in layer order): each routes the next."""
    moes = [f for f in ffns if isinstance(f, MoE) and f.opts.pregated]
    for a, b in zip(moes, moes[1:], strict=False):
        a._next = (b,)


def load_balance(stats: dict[str, Tensor]) -> float:
    """max / mean tokens per expert of one call's ``stats`` (1.0 is perfect balance)."""
    counts = stats["tokens_per_expert"].float()
    return float(counts.max() / counts.mean().clamp(min=1e-9))
