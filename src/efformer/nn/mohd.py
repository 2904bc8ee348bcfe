"""The Mixture of Hidden Dimensions feed-forward block, after "Mixture of Hidden-Dimensions Transformer"
(Chen et al., ICML 2025, arXiv 2412.05644): each token reads and writes only some sub-dimensions of the
hidden state.

The hidden dimension d is cut into ``n_groups`` equal sub-dimensions. The first ``n_shared`` are
active for every token (the paper's shared sub-dimensions, for features common to many tokens); a
router picks ``top_k`` of the others per token (the specialized sub-dimensions). The FFN's input
projection reads only the active sub-dimensions' rows and its output projection writes only their
columns, so a token costs (n_shared + top_k) / n_groups of the dense FFN's two projections:

    x_f = fuse(x)                                   group fusion, before the sparsification
    h   = act(alpha * (x_f * s) W_gate) * (alpha * (x_f * s) W_up)      s: 0/1 mask of active dims
    y   = (h W_down) * w                            w: a sub-dimension's gate (0 where inactive)

Gates: shared sub-dimensions 1; a routed one top_k * p / (sum of the chosen p), with p the router's
softmax over the routed sub-dimensions (1 each when the router is uniform, so "every sub-dimension
active with a uniform router and alpha = 1" is the dense GLU with the same weights).

Activation scaling (``alpha``): reading a fraction f of the input dimensions shrinks the expected
pre-activation by f, so the read is multiplied by 1 / f = n_groups / (n_shared + top_k) by default
(``activation_scale``; 1 turns it off). Group fusion: an n_groups x n_groups matrix, initialised to
the identity, mixes the sub-dimensions position by position before the sparsification (a cheap
O(d * n_groups) structured mixing), so information in a token's inactive sub-dimensions can still
reach the active ones. ``moe_balance`` is the Switch load-balancing loss over the routed
sub-dimensions.

Choices (the stored copies of the paper end before its method section, so its equations could not
be checked): the sub-dimensions are those of d_model, where the abstract places the sparsity ("token
dimensions"); the scaling and fusion above are this library's reading of the abstract's "activation
scaling" and "group fusion", not the paper's formulas (a public summary describes its fusion as a
Monarch matrix; a dense group-mixing matrix is used instead). The attention-projection variant is
not built.

Forms: ``grouped`` runs each sub-dimension's slice of the projections once over the tokens that
have it active (a loop over sub-dimensions, never over tokens; only the active work is done);
``masked`` multiplies the masked input by the full matrices (dense cost, the plainest batched form);
``reference`` runs token by token over each token's list of active sub-dimensions. ``auto`` picks
masked: the grouped form's thin per-slice matmuls were slower on a CPU even at 4 of 16 sub-dimensions
active (d_model 512; ``benchmarks/mohd_forms.py``), so its saving needs a gather-matmul kernel.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.nn.ffn import _ACTS
from efformer.options import StrictModel, validate_options
from efformer.registry import FFNS


class MoHDOptions(StrictModel):
    """Options of the ``mohd`` feed-forward block (``ffn_options`` of the model config)."""

    n_groups: int = pydantic.Field(8, ge=1, description="Sub-dimensions d_model is cut into (must divide it).")
    n_shared: int = pydantic.Field(2, ge=0, description="Sub-dimensions active for every token (the first ones).")
    top_k: int = pydantic.Field(2, ge=0, description="Routed sub-dimensions per token; <= n_groups - n_shared.")
    activation_scale: float | None = pydantic.Field(
        None, gt=0, description="alpha multiplying the sparse read; None: n_groups / (n_shared + top_k).")
    group_fusion: bool = pydantic.Field(True, description="Mix sub-dimensions (identity at init) before routing.")
    activation: Literal["silu", "gelu", "relu"] = pydantic.Field("silu", description="GLU activation.")
    aux_loss_weight: float = pydantic.Field(0.01, ge=0, description="Weight of the load-balancing loss.")
    form: Literal["auto", "grouped", "masked", "reference"] = pydantic.Field(
        "auto", description="grouped: only the active slices; masked: dense masked matmuls (auto); reference: "
        "token by token.")

    @pydantic.model_validator(mode="after")
    def _check(self) -> MoHDOptions:
        if self.n_shared + self.top_k > self.n_groups:
            raise ValueError(f"n_shared={self.n_shared} + top_k={self.top_k} is more than n_groups={self.n_groups}; "
                             "lower them or add groups")
        if self.n_shared + self.top_k == 0:
            raise ValueError("n_shared + top_k is 0: no sub-dimension would ever be active")
        return self


@FFNS.register("mohd")
class MoHD(nn.Module):
    """Mixture of Hidden Dimensions FFN: (b, n, d) -> (b, n, d); ``aux_losses`` and ``stats`` of the last call."""

    Options = MoHDOptions
    takes_mask = True  # padding activates no sub-dimension and is left out of the balance loss

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, *, options=None, causal: bool = False):
        super().__init__()
        self.opts = o = validate_options(MoHDOptions, options, "ffn_options")
        if d_model % o.n_groups:
            raise ConfigError("ffn_options.n_groups", o.n_groups, f"must divide d_model={d_model} (sub-dimensions "
                              "are equal slices of the hidden state)")
        self.gs = d_model // o.n_groups
        hidden = max(1, round(2 * mult * d_model / 3))  # swiglu's width
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.n_routed = o.n_groups - o.n_shared
        if self.n_routed and o.top_k:
            self.router = nn.Linear(d_model, self.n_routed, bias=False)
        if o.group_fusion:
            self.fusion = nn.Parameter(torch.eye(o.n_groups))
        self.alpha = o.activation_scale or o.n_groups / (o.n_shared + o.top_k)
        self.act = _ACTS[o.activation]
        self.drop = nn.Dropout(dropout)
        self.aux_losses: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}

    def route(self, x: Tensor, valid: Tensor) -> Tensor:
        """Gates (t, n_groups) for flat tokens x (t, d): 1 on shared, top_k * p / sum(chosen p) on the chosen
        routed sub-dimensions, 0 elsewhere and on padding. Also sets ``aux_losses`` and ``stats``."""
        o = self.opts
        t = x.shape[0]
        gates = x.new_zeros(t, o.n_groups)
        gates[:, : o.n_shared] = 1.0
        if hasattr(self, "router"):
            probs = self.router(x).float().softmax(-1)
            topv, topi = probs.topk(o.top_k, -1)
            routed = torch.zeros_like(probs).scatter(-1, topi, o.top_k * topv / topv.sum(-1, keepdim=True))
            gates = torch.cat([gates[:, : o.n_shared], routed.to(x.dtype)], -1)
            real = valid.nonzero().squeeze(1)
            f = torch.bincount(topi[real].reshape(-1), minlength=self.n_routed).float() / max(real.numel() * o.top_k, 1)
            p = probs[real].mean(0) if len(real) else probs.new_zeros(self.n_routed)
            self.aux_losses = {"moe_balance": o.aux_loss_weight * self.n_routed * (f * p).sum()}
        gates = gates.masked_fill(~valid[:, None], 0.0)
        active = gates != 0
        self.stats = {"tokens_per_group": active.sum(0), "groups_per_token": active.sum(-1)}
        return gates

    def fuse(self, x: Tensor) -> Tensor:
        """Group fusion of flat tokens (t, d): sub-dimension g becomes sum_h F[g, h] * sub-dimension h."""
        if not self.opts.group_fusion:
            return x
        t = x.shape[0]
        groups = x.view(t, self.opts.n_groups, self.gs)
        return torch.einsum("gh,thc->tgc", self.fusion.to(x.dtype), groups).reshape(t, -1)

    def _glu(self, pre: Tensor) -> Tensor:
        g, u = pre.chunk(2, -1)
        return self.drop(self.act(g) * u)

    def _masked(self, x: Tensor, gates: Tensor) -> Tensor:
        dims = (gates != 0).to(x.dtype).repeat_interleave(self.gs, -1)
        h = self._glu(self.gate_up(self.alpha * x * dims))
        return self.down(h) * gates.repeat_interleave(self.gs, -1)

    def _grouped(self, x: Tensor, gates: Tensor) -> Tensor:
        t, gs = x.shape[0], self.gs
        w_in, w_out = self.gate_up.weight, self.down.weight  # (2h, d), (d, h)
        toks = [(gates[:, g] != 0).nonzero().squeeze(1) for g in range(self.opts.n_groups)]
        # each active read: the tokens' slice times the slice's rows (accumulated in the matmuls' dtype,
        # which autocast may lower)
        reads = [(tok, (self.alpha * x[tok, g * gs : (g + 1) * gs]) @ w_in[:, g * gs : (g + 1) * gs].t())
                 for g, tok in enumerate(toks) if len(tok)]
        pre = x.new_zeros(t, w_in.shape[0], dtype=reads[0][1].dtype if reads else x.dtype)
        for tok, part in reads:  # in place: index_add's backward needs no saved accumulator
            pre.index_add_(0, tok, part)
        h = self._glu(pre)
        outs = []
        for g, tok in enumerate(toks):  # each active write: only the slice's columns of the output
            out = h.new_zeros(t, gs)
            if len(tok):
                part = (h[tok] @ w_out[g * gs : (g + 1) * gs].t()) * gates[tok, g, None]
                out = out.to(part.dtype).index_add(0, tok, part)
            outs.append(out)
        return torch.cat(outs, -1)

    def _reference(self, x: Tensor, gates: Tensor) -> Tensor:
        rows = []
        for t in range(x.shape[0]):
            active = (gates[t] != 0).nonzero().squeeze(1).tolist()
            idx = [c for g in active for c in range(g * self.gs, (g + 1) * self.gs)]
            y = x.new_zeros(x.shape[1])
            if idx:
                idx_t = torch.tensor(idx, device=x.device)
                h = self._glu(self.gate_up.weight[:, idx_t] @ (self.alpha * x[t, idx_t]))
                y = y.index_copy(0, idx_t, (self.down.weight[idx_t] @ h) * gates[t].repeat_interleave(self.gs)[idx_t])
            rows.append(y)
        return torch.stack(rows) if rows else x

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(b, n, d) -> (b, n, d); ``mask`` (b, n) keeps real tokens (padding gets a zero output)."""
        b, n, d = x.shape
        flat = x.reshape(b * n, d)
        valid = mask.reshape(-1) if mask is not None else torch.ones(b * n, dtype=torch.bool, device=x.device)
        gates = self.route(flat, valid)
        fused = self.fuse(flat)
        run = {"grouped": self._grouped, "reference": self._reference}.get(self.opts.form, self._masked)
        y = run(fused, gates)
        return y.reshape(b, n, d)
