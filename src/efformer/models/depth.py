"""Mixture-of-Depths, after "Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models" (Raposo et al., 2024): a router scores every token, the top ``capacity`` fraction of
each row goes through the block (its mixer sees only those tokens, at their own positions), the rest
ride the residual stream unchanged. The chosen tokens' update is scaled by the router's weight
(``gate="multiply"``: sigmoid of the score, so the router learns from the loss), or passed through
unscaled with the router's gradient taken straight through (``gate="straight_through"``).

Top-k over a sequence is not causal (a token's selection depends on later tokens), so causal models
decode with the paper's auxiliary predictor: a small MLP that reads the router's input (gradient
stopped) and is trained with binary cross-entropy to predict membership in the top-k; in evaluation
a causal model routes a token through the block iff the predictor says so, token by token.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.mixers.base import Mixer, MixerState
from efformer.models.block import Block
from efformer.models.config import ModelConfig
from efformer.nn.positional import PositionalContext

Routing = Literal["auto", "topk", "predictor"]


class MoDBlock(nn.Module):
    """A block that only the routed tokens go through: (b, n, d) -> (b, n, d), threading the decode state."""

    def __init__(self, cfg: ModelConfig, mixer_name: str, mixer_options: dict, capacity: float,
                 layer: int | None = None):
        super().__init__()
        self.block = Block(cfg, mixer_name, mixer_options, layer)
        self.capacity, self.gate, self.causal = capacity, cfg.mod_gate, cfg.causal
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.zeros_(self.router.weight)  # an even start: sigmoid gates of 0.5, ties broken by position
        hidden = max(8, cfg.d_model // 4)
        self.predictor = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.predictor_weight = cfg.mod_predictor_weight
        self.routing: Routing = "auto"  # tests force "topk" or "predictor"
        self._scheme: tuple = ()
        self.aux_losses: dict[str, Tensor] = {}
        self.last_selected: Tensor | None = None  # (b, n) bool of the last call

    @property
    def mixer(self) -> Mixer:
        """The inner block's mixer (the backbone asks it for decode states)."""
        return self.block.mixer

    @property
    def ffn(self) -> nn.Module:
        """The inner block's feed-forward block."""
        return self.block.ffn

    def bind_positional(self, scheme: nn.Module) -> None:
        """The model's positional scheme, to build the context of the chosen tokens (held, not owned)."""
        self._scheme = (scheme,)

    def mode(self) -> str:
        """``topk`` in training and in bidirectional models, the causal ``predictor`` in causal evaluation."""
        if self.routing != "auto":
            return self.routing
        return "predictor" if self.causal and not self.training else "topk"

    def select(self, x: Tensor, scores: Tensor, mask: Tensor | None) -> Tensor:
        """Which tokens (b, n) go through the block; sets the predictor's loss when choosing top-k."""
        b, n, _ = x.shape
        real = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        pred = self.predictor(x.detach()).squeeze(-1).float()
        if self.mode() == "predictor":
            self.aux_losses = {}
            return (pred > 0) & real
        k = torch.ceil(self.capacity * real.sum(1).double() - 1e-9).long().clamp(min=1)  # (b,)
        ranked = scores.detach().masked_fill(~real, -math.inf)
        order = ranked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
        chosen = (rank < k[:, None]) & real
        if self.training and real.any():
            bce = F.binary_cross_entropy_with_logits(pred[real], chosen[real].float())
            self.aux_losses = {"mod_predictor": self.predictor_weight * bce}
        return chosen

    def forward(
        self, x: Tensor, *, mask: Tensor | None, state: MixerState | None, positions: PositionalContext
    ) -> tuple[Tensor, MixerState | None]:
        """(b, n, d) -> (b, n, d); unchosen tokens pass unchanged and never enter the mixer's state."""
        b, n, d = x.shape
        scores = self.router(x).squeeze(-1).float()
        chosen = self.select(x, scores, mask)
        self.last_selected = chosen
        m = int(chosen.sum(1).max()) if n else 0
        if m == 0:
            return x, state
        # chosen tokens of each row in order, right-aligned (left padding, as prompts are padded)
        key = torch.where(chosen, torch.arange(n, device=x.device).expand(b, n), -1)
        idx = key.sort(dim=1).values[:, n - m:]
        keep = idx >= 0
        idx = idx.clamp(min=0)
        sub = x.gather(1, idx[..., None].expand(-1, -1, d))
        sub_pos = positions.positions.gather(1, idx)
        ctx = self._scheme[0].context(sub_pos, x.dtype) if self._scheme else PositionalContext(sub_pos)
        y, state = self.block(sub, mask=None if bool(keep.all()) else keep, state=state, positions=ctx)
        r = torch.sigmoid(scores.gather(1, idx)).to(x.dtype)[..., None]
        if self.gate == "multiply":
            new = sub + r * (y - sub)
        else:  # forward value exactly y (the plain block's output), router gradient as if multiplied
            new = y + (r - r.detach()) * (y - sub)
        rows = torch.arange(b, device=x.device)[:, None].expand_as(idx)
        return x.index_put((rows[keep], idx[keep]), new[keep]), state


def make_block(cfg: ModelConfig, layer: int, mixer_name: str, mixer_options: dict) -> nn.Module:
    """Layer ``layer``'s block: a MoDBlock where the config gives it a capacity, else a plain Block."""
    capacity = cfg.layer_mod_capacity(layer)
    block = Block(cfg, mixer_name, mixer_options, layer) if capacity is None else MoDBlock(
        cfg, mixer_name, mixer_options, capacity, layer)
    if hasattr(block.ffn, "configure_layer"):  # an extracted MatFormer keeps this layer's neurons only
        block.ffn.configure_layer(layer)
    return block
