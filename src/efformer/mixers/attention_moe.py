"""Attention MoE of "LLaMA-MoE v2: Exploring Sparsity of LLaMA from Perspective of Mixture-of-Experts
with Post-Training" (Qu et al., 2024): the query heads are split into expert groups, a router picks
each token's top-k groups, and the output projection sums only the chosen groups, weighted by their
gates; keys and values stay shared by every head (so the KV cache is softmax attention's).

Since the output projection is linear over the concatenated heads, "sum over chosen experts of
gate * W_o[:, expert's columns] @ expert's head outputs" is the softmax attention with each head's
output scaled by its group's gate (zero for unchosen groups) before W_o: that is how both forms
compute it. The heads are computed densely (the routing is the model; skipping unchosen query heads
would be the saving, not done here). ``convert_attention_to_moe`` (``efformer.models.moe_convert``)
makes one from trained softmax attention: router zero (uniform gates) and ``expert_scale =
n_experts``, so with top_k = n_experts it is the softmax attention. The router's Switch-style balance
loss is in ``aux_losses`` as ``attn_moe_balance``.
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import ConfigError
from efformer.mixers.base import Capabilities
from efformer.mixers.softmax import SoftmaxAttention, SoftmaxOptions
from efformer.registry import register_mixer


class AttentionMoEOptions(SoftmaxOptions):
    """Options of attention MoE (softmax attention whose query-head groups are routed experts)."""

    n_experts: int = pydantic.Field(4, ge=1, description="Expert groups of query heads; must divide n_heads.")
    top_k: int = pydantic.Field(2, ge=1, description="Groups each token uses; must be <= n_experts.")
    normalize_topk: bool = pydantic.Field(False, description="Renormalise the chosen gates to sum to one.")
    expert_scale: float = pydantic.Field(1.0, gt=0, description="Multiplier of every gate (n_experts after "
                                         "converting trained attention: uniform gates then weigh each head 1).")
    aux_loss_weight: float = pydantic.Field(0.01, ge=0, description="Weight of the load-balancing loss.")


@register_mixer("attention_moe")
class AttentionMoE(SoftmaxAttention):
    """Softmax attention whose query-head groups are top-k routed experts: (b, n, d) -> (b, n, d)."""

    capabilities = Capabilities(
        family="softmax",
        paper="LLaMA-MoE v2: Exploring Sparsity of LLaMA from Perspective of Mixture-of-Experts with Post-Training",
        causal=True,
        bidirectional=True,
        padding_mask=True,
        decode=True,
        exact=False,  # routed heads: softmax attention only with every group chosen at weight 1
        time="O(N^2 d) (heads computed densely)",
        memory="O(N d) fused (SDPA), O(N^2) reference",
        forms=("reference", "fast"),
        attention_bias=True,
        rotary=True,
        packing=True,
    )
    Options = AttentionMoEOptions
    test_options = {"n_experts": 2, "top_k": 1, "n_kv_heads": 2}

    def __init__(self, d_model: int, n_heads: int, **kw):
        super().__init__(d_model, n_heads, **kw)
        o = self.opts
        if n_heads % o.n_experts:
            raise ConfigError(f"{self.name}.n_experts", o.n_experts, f"must divide n_heads={n_heads} (each expert "
                              "is an equal group of query heads)")
        if o.top_k > o.n_experts:
            raise ConfigError(f"{self.name}.top_k", o.top_k, f"at most n_experts={o.n_experts}")
        if o.split_kv_from is not None:
            raise ConfigError(f"{self.name}.split_kv_from", o.split_kv_from, "None: the split-KV decode path "
                              "does not route heads")
        self.router = nn.Linear(d_model, o.n_experts, bias=False)
        self.aux_losses: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}
        self._keep: Tensor | None = None

    def head_gates(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Gates (b, n, n_experts) of x (b, n, d): the top-k softmax probabilities (times expert_scale), else 0.

        Also sets ``aux_losses`` (in training: balance over the ``keep`` (b, n) tokens) and ``stats``."""
        o = self.opts
        probs = self.router(x).float().softmax(-1)
        top, idx = probs.topk(o.top_k, dim=-1)
        if o.normalize_topk:
            top = top / top.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, idx, top) * o.expert_scale
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if keep is None else keep
        chosen = (gates > 0)[real].float()  # (tokens, e)
        counts = chosen.sum(0)
        self.aux_losses = {}  # training only: a graph held in eval would pin memory and block deepcopy
        if self.training and bool(real.any()):
            f = counts / chosen.sum().clamp(min=1)
            self.aux_losses = {"attn_moe_balance": o.aux_loss_weight * o.n_experts * (f * probs[real].mean(0)).sum()}
        self.stats = {"tokens_per_expert": counts.long()}
        return gates

    def _finish(self, o: Tensor, x: Tensor | None = None) -> Tensor:
        """Head outputs (b, h, n, dh) scaled by their group's gate, then the output projection."""
        gates = self.head_gates(x, self._keep).to(o.dtype)  # (b, n, e)
        per_head = gates.repeat_interleave(self.n_heads // self.opts.n_experts, dim=-1)  # (b, n, h)
        return self.out_proj(self.merge_heads(o * per_head.transpose(1, 2)[..., None]))

    def forward_reference(self, x, *, mask, state, pos):
        """Softmax attention's explicit form, heads gated by the router."""
        self._keep = mask
        return super().forward_reference(x, mask=mask, state=state, pos=pos)

    def forward_fast(self, x, *, mask, state, pos):
        """Softmax attention's SDPA form, heads gated by the router."""
        self._keep = mask
        return super().forward_fast(x, mask=mask, state=state, pos=pos)
