"""The token-mixer contract: ``y, state = mixer(x, mask=..., state=..., positions=...)``.

Every mechanism subclasses :class:`Mixer`, declares :class:`Capabilities` as data, validates its
own options with a pydantic ``Options`` model, and implements one ``forward_<form>`` method per
form it has (``reference`` always; ``fast``, ``chunked``, ``recurrent``, ``triton`` where they
exist). Tests force each form and compare it with ``reference``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pydantic
import torch
from einops import rearrange
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.options import validate_options

FORMS = ("reference", "fast", "chunked", "recurrent", "triton")
# "auto" picks the first available form in this order (triton only on CUDA).
_AUTO_ORDER = ("triton", "fast", "chunked", "recurrent", "reference")


@dataclass(frozen=True)
class Capabilities:
    """What a mixer can do, declared as data and checked by the model builder."""

    family: str  # e.g. "softmax", "local", "low-rank", "kernel", "hashing", "recurrent", "ssm"
    paper: str  # title of the paper that defines the mechanism
    causal: bool  # can run as a causal (autoregressive) mixer
    bidirectional: bool  # can run as a bidirectional (encoder) mixer
    padding_mask: bool  # honours a boolean keep-mask (batch, seq)
    decode: bool  # has a decode state (KV cache, window, running sums, SSM state)
    exact: bool  # computes exact softmax attention (else an approximation or another operator)
    time: str  # time complexity, e.g. "O(N^2 d)"
    memory: str  # memory complexity of the fast form, e.g. "O(N d)"
    forms: tuple[str, ...] = ("reference",)
    attention_bias: bool = False  # accepts an additive score bias (ALiBi, T5, FIRE)
    rotary: bool = False  # accepts a rotary transform of q and k (RoPE, xPos)

    def as_dict(self) -> dict[str, Any]:
        """The capabilities as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["forms"] = list(self.forms)
        return d


class MixerOptions(pydantic.BaseModel):
    """Options every mixer accepts; subclasses add their own fields (unknown keys are refused)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    form: str = "auto"  # which implementation to run: "auto" or one of capabilities.forms


class MixerState:
    """Base of per-layer decode states: dataclasses of tensors whose dim 0 is the batch.

    ``seen`` counts the tokens consumed so far (the default position offset).
    """

    seen: int = 0

    def select(self, index: Tensor) -> MixerState:
        """The state of the batch rows in ``index`` (drops finished rows in batched generation)."""
        new = dataclasses.replace(
            self, **{f.name: _select(getattr(self, f.name), index) for f in dataclasses.fields(self)}
        )
        new.seen = self.seen
        return new


def _select(value: Any, index: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value.index_select(0, index.to(value.device))
    if isinstance(value, list | tuple):
        return type(value)(_select(v, index) for v in value)
    return value


class Mixer(nn.Module):
    """Base class of token mixers: (batch, seq, d_model) -> (batch, seq, d_model), plus a decode state.

    Args:
        d_model: model width.
        n_heads: number of heads (must divide ``d_model``).
        causal: run as an autoregressive mixer (position i sees only positions <= i).
        options: the mixer's own options (a dict or its ``Options`` model).
        rotary: a rotary positional scheme applied to q and k (needs ``capabilities.rotary``).
        attn_bias: an additive score-bias scheme (needs ``capabilities.attention_bias``).
        dropout: attention-probability dropout where the mechanism has probabilities.
    """

    name: ClassVar[str] = "?"
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type[MixerOptions]] = MixerOptions
    # Small options the contract tests use so that odd lengths hit block/chunk/window edges.
    test_options: ClassVar[dict[str, Any]] = {}
    # On CPU, "auto" runs the reference form for sequences of at most this many tokens (cached ones
    # included), where it was measured faster than the fast form's gather/scan overhead; 0 = never.
    reference_below: ClassVar[int] = 0

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        options: dict[str, Any] | MixerOptions | None = None,
        rotary: nn.Module | None = None,
        attn_bias: nn.Module | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        caps = self.capabilities
        if causal and not caps.causal:
            raise CapabilityError(
                f"mixer {self.name!r} cannot be causal: it is bidirectional only; "
                "use it in an encoder, or pick a causal mixer for a causal LM"
            )
        if not causal and not caps.bidirectional:
            raise CapabilityError(
                f"mixer {self.name!r} is causal only; set causal=True or pick a bidirectional mixer"
            )
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads:
            raise ConfigError("n_heads", n_heads, f"must be positive and divide d_model={d_model}")
        self.opts = validate_options(self.Options, options, self.name)
        if self.opts.form != "auto" and self.opts.form not in caps.forms:
            raise ConfigError(
                f"{self.name}.form", self.opts.form, f"one of 'auto', {', '.join(map(repr, caps.forms))}"
            )
        if rotary is not None and not caps.rotary:
            raise CapabilityError(
                f"mixer {self.name!r} cannot take a rotary positional scheme (it has no explicit "
                "q/k dot product to rotate); use an embedding scheme (sinusoidal, learned) or none"
            )
        if attn_bias is not None and not caps.attention_bias:
            raise CapabilityError(
                f"mixer {self.name!r} cannot take an additive attention bias (ALiBi, T5, FIRE): it "
                "never forms the score matrix; use rope, an embedding scheme, or none"
            )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal = causal
        # Positional schemes are owned (and registered) by the model and shared by every layer, as
        # in T5 and ALiBi; holding them outside _modules keeps the state dict free of duplicates.
        object.__setattr__(self, "rotary", rotary)
        object.__setattr__(self, "attn_bias", attn_bias)
        self.dropout = dropout

    # ---- the call -------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        state: MixerState | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, MixerState | None]:
        """Mix tokens of ``x`` (batch, seq, d_model); returns ``(y, state)`` (state None unless given).

        ``mask`` is a boolean keep-mask (batch, seq); outputs at dropped positions are zero.
        ``state`` is the decode state from :meth:`init_state` or the previous call.
        ``positions`` are absolute positions (batch, seq); default ``state.seen + arange(seq)``.
        """
        b, n = self._check_inputs(x, mask, state, positions)
        if positions is None:
            offset = state.seen if state is not None else 0
            positions = torch.arange(offset, offset + n, device=x.device).expand(b, n)
        form = self.resolve_form(x, state)
        y, state = getattr(self, f"forward_{form}")(x, mask=mask, state=state, positions=positions)
        if state is not None:
            state.seen += n
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y, state

    def resolve_form(self, x: Tensor, state: MixerState | None) -> str:
        """The form to run: the configured one, or for "auto" the fastest that runs here."""
        if self.opts.form != "auto":
            return self.opts.form
        forms = self.capabilities.forms
        if state is not None and "recurrent" in forms and x.shape[1] == 1:
            return "recurrent"
        total = x.shape[1] + (state.seen if state is not None else 0)
        if not x.is_cuda and total <= self.reference_below:
            return "reference"
        for f in _AUTO_ORDER:
            if f in forms and (f != "triton" or x.is_cuda):
                return f
        return "reference"

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        """An empty decode state for ``batch`` sequences (mixers with ``capabilities.decode``)."""
        raise CapabilityError(f"mixer {self.name!r} has no decode state; recompute the full sequence")

    def forward_reference(self, x, *, mask, state, positions):  # pragma: no cover - abstract
        """The plain, obviously-correct definition (may be quadratic or sequential)."""
        raise NotImplementedError

    # ---- helpers shared by mechanisms -----------------------------------------------------
    def _check_inputs(self, x, mask, state, positions) -> tuple[int, int]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{self.name}: x must be (batch, seq, {self.d_model}), got {got}")
        b, n = x.shape[:2]
        if n == 0:
            raise ShapeError(f"{self.name}: x has an empty sequence (seq=0); pass at least one token")
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
                raise ShapeError(
                    f"{self.name}: mask must be a bool keep-mask of shape ({b}, {n}), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            if not self.capabilities.padding_mask:
                raise CapabilityError(f"mixer {self.name!r} does not support a padding mask")
        if positions is not None and tuple(positions.shape) != (b, n):
            raise ShapeError(f"{self.name}: positions must be ({b}, {n}), got {tuple(positions.shape)}")
        if state is not None and not self.capabilities.decode:
            raise CapabilityError(f"mixer {self.name!r} has no decode state; recompute the full sequence")
        return b, n

    def split_heads(self, t: Tensor, heads: int | None = None) -> Tensor:
        """(batch, seq, heads*dim) -> (batch, heads, seq, dim)."""
        return rearrange(t, "b n (h d) -> b h n d", h=heads or self.n_heads)

    @staticmethod
    def merge_heads(t: Tensor) -> Tensor:
        """(batch, heads, seq, dim) -> (batch, seq, heads*dim)."""
        return rearrange(t, "b h n d -> b n (h d)")


def with_max_len(cls: type[Mixer], options: dict[str, Any], max_len: int) -> dict[str, Any]:
    """``options`` plus ``max_len`` for mixers that size tables by it (Linformer E/F, cosFormer M, ...)."""
    if "max_len" in cls.Options.model_fields and "max_len" not in options:
        return {**options, "max_len": max_len}
    return options


def causal_keep(n_q: int, n_k: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (n_q, n_k): query i (the last n_q of n_k positions) may see key j iff j <= i + n_k - n_q."""
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] <= i


def pad_to_multiple(x: Tensor, multiple: int, dim: int = 1, value: float = 0.0) -> tuple[Tensor, int]:
    """Right-pad ``x`` along ``dim`` to a multiple of ``multiple``; returns (padded, pad_amount)."""
    n = x.shape[dim]
    pad = (-n) % multiple
    if pad == 0:
        return x, 0
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim), pad


Direction = Literal["causal", "bidirectional"]
