"""Feed-forward blocks: the MLP (GELU, ReLU, squared ReLU from "Primer: Searching for Efficient
Transformers for Language Modeling") and the GLU family from "GLU Variants Improve Transformer"
(Shazeer, 2020): SwiGLU, GeGLU, ReGLU."""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from efformer.options import StrictModel
from efformer.registry import FFNS


class FFNOptions(StrictModel):
    """Feed-forward blocks take their width from the model config."""


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


# gelu_tanh: the tanh approximation of GELU, GPT-2's "gelu_new"
_ACTS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu, "relu2": _relu2,
         "silu": F.silu}


class MLP(nn.Module):
    """Two-layer MLP: (b, n, d) -> (b, n, d) with hidden width ``mult * d`` (or ``hidden``, set by pruning);
    biased unless ``bias=False``."""

    Options = FFNOptions
    activation = "gelu"

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, bias: bool = True,
                 hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(1, round(mult * d_model))
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.act = _ACTS[self.activation]

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, d)."""
        return self.down(self.drop(self.act(self.up(x))))


class GLU(nn.Module):
    """Gated linear unit FFN: down(act(gate(x)) * up(x)); hidden = 2/3 * mult * d keeps MLP's params;
    unbiased unless ``bias=True``; ``hidden`` (set by pruning) overrides the width."""

    Options = FFNOptions
    activation = "silu"

    def __init__(self, d_model: int, mult: float = 4.0, dropout: float = 0.0, bias: bool = False,
                 hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(1, round(2 * mult * d_model / 3))
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.act = _ACTS[self.activation]

    def forward(self, x: Tensor) -> Tensor:
        """(b, n, d) -> (b, n, d)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.drop(self.act(gate) * up))


def _variant(base: type, act: str, doc: str) -> type:
    return type(f"{base.__name__}_{act}", (base,), {"activation": act, "__doc__": doc})


for _name, _base, _act in [
    ("gelu", MLP, "gelu"),
    ("gelu_tanh", MLP, "gelu_tanh"),
    ("relu", MLP, "relu"),
    ("relu2", MLP, "relu2"),
    ("swiglu", GLU, "silu"),
    ("geglu", GLU, "gelu"),
    ("reglu", GLU, "relu"),
]:
    FFNS.register(_name)(_variant(_base, _act, f"{_name} feed-forward block: (b, n, d) -> (b, n, d)."))
